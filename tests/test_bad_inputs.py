"""A corpus of bad and unusual inputs against every user-facing command.

Every case must end in exactly one ``error:`` line and exit status 2, print no traceback, create
nothing at the output path (not even its folder), and leave every input byte for byte as it was.
The commands run in-process through ``cli_main`` (fast: random weights, tiny configs).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from moditalker.errors import cli_main

REPO = Path(__file__).resolve().parents[1]
ATOM_TINY = str(REPO / "configs" / "atom_tiny.yaml")
MTOV_TINY = str(REPO / "configs" / "mtov_tiny.yaml")
PIPE_TINY = str(REPO / "configs" / "inference_tiny.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good inputs and a shelf of bad ones, made once."""
    from PIL import Image

    from data.sample_data import write_reference_image, write_reference_video, write_speech

    d = tmp_path_factory.mktemp("corpus")
    f = {
        "speech": write_speech(d / "speech.wav", seconds=1.0),
        "ref_video": write_reference_video(d / "ref.mp4", seconds=0.4, size=64),
        "ref_image": write_reference_image(d / "ref.png", size=64),
    }
    np.save(d / "hubert.npy", np.zeros((100, 16), np.float32))
    np.save(d / "ref_lm3d.npy", np.zeros((68, 3), np.float32))
    np.save(d / "frontal.npy", np.zeros((10, 68, 3), np.float32))
    np.save(d / "aligned.npy", np.full((10, 68, 2), 16.0, np.float32))
    np.save(d / "wrong_shape.npy", np.zeros((7, 5), np.float32))
    frames = d / "frames"
    frames.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(frames / "00000.png")
    (d / "empty.wav").write_bytes(b"")
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.wav").write_text("these are not samples\n")
    (d / "text.mp4").write_text("this is not a video\n")
    (d / "text.png").write_text("this is not an image\n")
    (d / "text.npy").write_text("this is not an array\n")
    (d / "empty.pt").write_bytes(b"")
    (d / "drive.pt").write_text("<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title>")
    torch.save({"w": torch.zeros(500)}, d / "whole.pt")
    (d / "truncated.pt").write_bytes((d / "whole.pt").read_bytes()[:200])
    (d / "typo.yaml").write_text("atom:\n  stesp: 10\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "broken.yaml").write_text("a: [1, 2\n")
    (d / "a_file").write_text("in the way\n")
    (d / "folder").mkdir()
    f.update({p.name: p for p in d.iterdir()})
    f["dir"] = d
    return f


def _digest(path: Path) -> str:
    if path.is_dir():
        return "|".join(f"{p.name}:{_digest(p)}" for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _audio_main(argv):
    from data.audio import main

    return main(argv)


def _atom_main(argv):
    from AToM.inference import main

    return main(argv)


def _align_main(argv):
    from data.motion_align import main

    return main(argv)


def _mtov_main(argv):
    from MToV.sample import main

    return main(argv)


def _pipeline_main(argv):
    from pipeline.inference import main

    return main(argv)


def _atom_train_main(argv):
    from AToM.train import main

    return main(argv)


def _ae_train_main(argv):
    from MToV.train_autoencoder import main

    return main(argv)


# (id, command, argv from files + output path, the output path to check)
Case = tuple[str, Callable, Callable[[dict, Path], list[str]], Callable[[Path], Path]]


def _audio(src: str, *extra: str):
    return lambda f, out: [
        "--audio",
        str(f[src]),
        "--out",
        str(out / "sub" / "h.npy"),
        "--random_weights",
        *extra,
    ]


def _atom(hub: str = "hubert.npy", ref: str = "ref_lm3d.npy", *extra: str):
    def argv(f, out):
        return ["--hubert", str(f[hub]), "--ref_lm3d", str(f[ref]), "--out", str(out / "sub" / "lm.npy"),
                "--config", ATOM_TINY, "--random_weights", *extra]  # fmt: skip

    return argv


def _atom_ckpt(ckpt: str):
    def argv(f, out):
        return ["--hubert", str(f["hubert.npy"]), "--ref_lm3d", str(f["ref_lm3d.npy"]),
                "--out", str(out / "sub" / "lm.npy"), "--config", ATOM_TINY, "--checkpoint", str(f[ckpt])]  # fmt: skip

    return argv


def _align(lm: str = "frontal.npy", ref: str = "ref.mp4", *extra: str):
    return lambda f, out: ["--landmarks", str(f[lm]), "--reference", str(f[ref]), "--out_dir", str(out / "sub"),
                           "--random_weights", *extra]  # fmt: skip


def _mtov(lm: str = "aligned.npy", *extra: str, ref=("--ref_frames", "frames")):
    return lambda f, out: ["--landmarks", str(f[lm]), ref[0], str(f[ref[1]]), "--out", str(out / "sub"),
                           "--config", MTOV_TINY, "--random_weights", "--no_progress", *extra]  # fmt: skip


def _mtov_ckpt(ckpt: str):
    return lambda f, out: _mtov()(f, out)[:-2] + ["--no_progress", "--ae_rgb", str(f[ckpt]),
                                                   "--ae_ldmk", str(f[ckpt]), "--unet", str(f[ckpt])]  # fmt: skip


def _pipe(audio: str = "speech.wav", ref: str = "ref.mp4", *extra: str, ref_flag: str = "--ref_video"):
    return lambda f, out: ["--audio", str(f[audio]), ref_flag, str(f[ref]), "--out", str(out / "sub" / "v.mp4"),
                           "--config", PIPE_TINY, "--random_weights", *extra]  # fmt: skip


CASES: list[tuple[str, Callable, Callable]] = [
    # process_audio
    ("audio-empty", _audio_main, _audio("empty.wav")),
    ("audio-text", _audio_main, _audio("text.wav")),
    ("audio-folder", _audio_main, _audio("folder")),
    ("audio-missing", _audio_main, lambda f, out: ["--audio", str(out / "nope.wav"), "--out", str(out / "sub" / "h.npy")]),
    ("audio-out-under-file", _audio_main, lambda f, out: ["--audio", str(f["speech.wav"]), "--out", str(f["a_file"] / "h.npy"), "--random_weights"]),
    # AToM inference
    ("atom-hubert-text", _atom_main, _atom("text.npy")),
    ("atom-hubert-shape", _atom_main, _atom("wrong_shape.npy")),
    ("atom-ref-shape", _atom_main, _atom("hubert.npy", "wrong_shape.npy")),
    ("atom-hubert-folder", _atom_main, _atom("folder")),
    ("atom-ckpt-empty", _atom_main, _atom_ckpt("empty.pt")),
    ("atom-ckpt-html", _atom_main, _atom_ckpt("drive.pt")),
    ("atom-ckpt-truncated", _atom_main, _atom_ckpt("truncated.pt")),
    ("atom-ckpt-foreign", _atom_main, _atom_ckpt("whole.pt")),
    ("atom-config-list", _atom_main, lambda f, out: _atom()(f, out)[:-3] + ["--config", str(f["list.yaml"]), "--random_weights"]),
    ("atom-config-broken", _atom_main, lambda f, out: _atom()(f, out)[:-3] + ["--config", str(f["broken.yaml"]), "--random_weights"]),
    # alignment
    ("align-landmarks-shape", _align_main, _align("wrong_shape.npy")),
    ("align-reference-text", _align_main, _align("frontal.npy", "text.mp4")),
    ("align-reference-empty", _align_main, _align("frontal.npy", "empty.mp4")),
    # MToV sampling
    ("mtov-landmarks-shape", _mtov_main, _mtov("wrong_shape.npy")),
    ("mtov-landmarks-text", _mtov_main, _mtov("text.npy")),
    ("mtov-ref-video-text", _mtov_main, _mtov(ref=("--ref_video", "text.mp4"))),
    ("mtov-ckpt-html", _mtov_main, _mtov_ckpt("drive.pt")),
    ("mtov-ckpt-empty", _mtov_main, _mtov_ckpt("empty.pt")),
    # the end-to-end pipeline
    ("pipe-audio-empty", _pipeline_main, _pipe("empty.wav")),
    ("pipe-audio-text", _pipeline_main, _pipe("text.wav")),
    ("pipe-ref-text", _pipeline_main, _pipe("speech.wav", "text.mp4")),
    ("pipe-ref-image-text", _pipeline_main, _pipe("speech.wav", "text.png", ref_flag="--ref_image")),
    ("pipe-ref-image-folder", _pipeline_main, _pipe("speech.wav", "folder", ref_flag="--ref_image")),
    ("pipe-config-typo", _pipeline_main, lambda f, out: _pipe()(f, out)[:-3] + ["--config", str(f["typo.yaml"]), "--random_weights"]),
    ("pipe-ref-frame-past-end", _pipeline_main, _pipe("speech.wav", "ref.mp4", "--ref_frame", "999")),
    ("pipe-both-references", _pipeline_main, lambda f, out: _pipe()(f, out) + ["--ref_image", str(f["ref.png"])]),
    ("pipe-random-one-mtov-ckpt", _pipeline_main, lambda f, out: _pipe()(f, out) + [f"assets.diffusion_model={f['whole.pt']}"]),
    ("pipe-random-missing-atom-ckpt", _pipeline_main, lambda f, out: _pipe()(f, out) + [f"assets.atom={out / 'nope.pt'}"]),
    # trainers
    ("atom-train-no-data", _atom_train_main, lambda f, out: ["--config", ATOM_TINY, "--cpu", f"data.root={f['folder']}", f"train.out_dir={out / 'sub'}"]),
    ("ae-train-no-data", _ae_train_main, lambda f, out: ["--config", str(REPO / "configs" / "mtov_autoencoder_tiny.yaml"), "--out_dir", str(out / "sub"), f"data.root={f['folder']}"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "command", "argv"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_no_trace(name, command, argv, files, tmp_path, capsys):
    before = {k: _digest(p) for k, p in files.items() if k != "dir"}
    listing = sorted(p.name for p in files["dir"].iterdir())
    with pytest.raises(SystemExit) as exc:
        cli_main(command, argv(files, tmp_path))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "sub").exists(), f"{name} left {sorted((tmp_path / 'sub').rglob('*'))}"
    assert {k: _digest(p) for k, p in files.items() if k != "dir"} == before
    assert sorted(p.name for p in files["dir"].iterdir()) == listing


def test_outputs_are_readable_by_others(files, tmp_path, capsys):
    """A successful run's files follow the umask (they were 0600)."""
    old = os.umask(0o022)
    try:
        cli_main(_audio_main, _audio("speech.wav")(files, tmp_path))
        cli_main(_atom_main, _atom()(files, tmp_path / "a"))
    finally:
        os.umask(old)
    for p in (
        tmp_path / "sub" / "h.npy",
        tmp_path / "a" / "sub" / "lm.npy",
        tmp_path / "a" / "sub" / "lm.yaml",
    ):
        assert p.stat().st_mode & 0o777 == 0o644, p
