"""Bad inputs to the user-facing commands: one ``error:`` line on stderr, exit status 2, nothing written.

Cases found by running the CLIs with broken files and settings; each module's own test file has the
cases specific to it, this file the ones shared by several loaders (checkpoints, .npy files, YAML).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from moditalker.errors import cli_main, describe

REPO = Path(__file__).resolve().parents[1]
MTOV_TINY = str(REPO / "configs" / "mtov_tiny.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: list[str], capsys) -> tuple[int, str]:
    """Run ``main`` through :func:`cli_main`; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    return exc.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_describe_is_one_line():
    assert describe(OSError("first\n\nsecond")) == "first"
    assert describe(EOFError()) == "EOFError"
    assert describe(ValueError("\n  indented  \nmore")) == "indented"


def _mtov_inputs(tmp_path: Path) -> list[str]:
    from PIL import Image

    ref = tmp_path / "ref"
    ref.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(ref / "00000.png")
    np.save(tmp_path / "aligned.npy", np.full((3, 68, 2), 16.0, np.float32))
    return ["--landmarks", str(tmp_path / "aligned.npy"), "--ref_frames", str(ref), "--config", MTOV_TINY]


def test_mtov_checkpoint_that_is_not_a_checkpoint(tmp_path, capsys):
    """torch.load's weights-only failure is several lines long; the error stays on one."""
    from MToV.sample import main

    not_ckpt = tmp_path / "weights.pth"
    with open(not_ckpt, "wb") as f:  # an .npy under a .pth name
        np.save(f, np.zeros(3))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    for bad in (not_ckpt, empty):
        argv = _mtov_inputs(tmp_path / bad.stem) + ["--out", str(out), "--no_progress"]
        argv += ["--ae_rgb", str(bad), "--ae_ldmk", str(bad), "--unet", str(bad)]
        code, err = run_cli(main, argv, capsys)
        assert_one_line_error(code, err, "cannot read", str(bad))
        assert not (out / "video.mp4").exists() and not (out / "config.yaml").exists()


def test_asset_download_error_is_one_line(tmp_path, monkeypatch, capsys):
    import transformers

    from moditalker.assets import main

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your internet connection.")

    monkeypatch.setattr(transformers.HubertModel, "from_pretrained", offline)
    monkeypatch.setenv("MODITALKER_CHECKPOINTS", str(tmp_path / "ck"))
    code, err = run_cli(main, ["download", "hubert"], capsys)
    assert_one_line_error(code, err, "cannot download", "couldn't connect")
    assert not (tmp_path / "ck" / "hubert-large-ls960-ft").exists()


@pytest.mark.parametrize("content,kind", [(b"", "empty file"), (b"hello\n", "not one"), (None, ".npz")])
def test_npy_inputs_that_are_not_npy(tmp_path, capsys, content, kind):
    """A zero-byte .npy gave an EOFError traceback; text and .npz files confusing messages."""
    from AToM.inference import main

    bad = tmp_path / "hubert.npy"
    if content is None:
        np.savez(tmp_path / "arch", a=np.zeros(3))
        (tmp_path / "arch.npz").rename(bad)
    else:
        bad.write_bytes(content)
    np.save(tmp_path / "ref.npy", np.zeros((68, 3), np.float32))
    out = tmp_path / "out" / "atom.npy"
    argv = ["--hubert", str(bad), "--ref_lm3d", str(tmp_path / "ref.npy"), "--out", str(out)]
    code, err = run_cli(main, argv + ["--random_weights"], capsys)
    assert_one_line_error(code, err, "HuBERT features", str(bad), kind)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--config", "BAD_YAML"], "cannot parse config"),
        (["atom.steps=[1"], "bad override 'atom.steps=[1'"),
    ],
)
def test_yaml_syntax_errors(tmp_path, capsys, extra, needle):
    """A YAML syntax error in a config file or an override was a yaml.ParserError traceback."""
    from pipeline.inference import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("atom: {steps: [1\n")
    out = tmp_path / "o.mp4"
    argv = ["--audio", "a.wav", "--ref_video", "v.mp4", "--out", str(out)]
    code, err = run_cli(main, argv + [str(bad) if e == "BAD_YAML" else e for e in extra], capsys)
    line = assert_one_line_error(code, err, needle)
    assert "line " in line  # where the parser stopped
    assert not out.exists() and not (tmp_path / "o_work").exists()


@pytest.mark.parametrize(
    "script,args",
    [
        ("inference_atom.sh", ["h.npy", "r.npy", "o.npy"]),
        ("sample_mtov.sh", ["--help"]),
        ("align_motion.sh", ["--help"]),
        ("process_audio.sh", ["--help"]),
        ("preprocess_hdtf.sh", ["--help"]),
        ("preprocess_lrs3.sh", ["--help"]),
    ],
)
def test_scripts_without_venv_say_so(tmp_path, script, args):
    """Without .venv these wrappers died with bash's 'No such file or directory' and exit 127
    (scripts/inference.sh already said 'run scripts/setup.sh')."""
    import shutil
    import subprocess

    shutil.copytree(REPO / "scripts", tmp_path / "scripts")  # a checkout without .venv
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    proc = subprocess.run(
        ["bash", str(tmp_path / "scripts" / script), *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "scripts/setup.sh" in lines[0], lines


def test_output_that_is_a_folder_with_overwrite(tmp_path, capsys):
    """AToM.inference --out d.npy --overwrite with d.npy a folder ran the model, then died with
    IsADirectoryError (data.audio and MToV.sample likewise)."""
    from AToM.inference import main

    (tmp_path / "d.npy").mkdir()
    np.save(tmp_path / "h.npy", np.zeros((4, 16), np.float32))
    np.save(tmp_path / "r.npy", np.zeros((68, 3), np.float32))
    argv = ["--hubert", str(tmp_path / "h.npy"), "--ref_lm3d", str(tmp_path / "r.npy")]
    code, err = run_cli(main, argv + ["--out", str(tmp_path / "d.npy"), "--overwrite"], capsys)
    assert_one_line_error(code, err, "is a folder")
    assert not any((tmp_path / "d.npy").iterdir()) and not (tmp_path / "d.yaml").exists()


def test_an_input_named_as_the_output_is_refused_even_with_overwrite(tmp_path, capsys):
    """``--out`` naming an input (or a hard link to it) replaced the input when ``--overwrite`` was given."""
    from AToM.inference import main as atom_main
    from data.audio import main as audio_main
    from data.sample_data import write_speech

    hub = tmp_path / "hubert.npy"
    np.save(hub, np.zeros((100, 16), np.float32))
    os.link(hub, tmp_path / "hardlink.npy")
    ref = tmp_path / "ref.npy"
    np.save(ref, np.zeros((68, 3), np.float32))
    speech = write_speech(tmp_path / "speech.wav", seconds=1.0)
    before = {p: p.read_bytes() for p in (hub, ref, speech)}
    for out in (hub, tmp_path / "hardlink.npy", ref):
        argv = ["--hubert", str(hub), "--ref_lm3d", str(ref), "--out", str(out), "--overwrite"]
        code, err = run_cli(atom_main, [*argv, "--random_weights"], capsys)
        assert_one_line_error(code, err, "is the input")
    code, err = run_cli(audio_main, ["--audio", str(speech), "--out", str(speech), "--overwrite"], capsys)
    assert_one_line_error(code, err)
    assert {p: p.read_bytes() for p in (hub, ref, speech)} == before


def test_pipeline_and_mtov_refuse_an_input_as_output(tmp_path, capsys):
    from data.sample_data import write_reference_video, write_speech
    from MToV.sample import main as mtov_main
    from pipeline.inference import main as pipeline_main

    speech = write_speech(tmp_path / "speech.mp4", seconds=1.0)
    ref = write_reference_video(tmp_path / "ref.mp4", seconds=0.5, size=64)
    before = {p: p.read_bytes() for p in (speech, ref)}
    for out in (speech, ref):
        argv = ["--audio", str(speech), "--ref_video", str(ref), "--out", str(out), "--overwrite"]
        code, err = run_cli(pipeline_main, [*argv, "--random_weights"], capsys)
        assert_one_line_error(code, err, "is the input")
    # a run's saved settings (OUT.yaml) as its own --config: the run would write over it
    saved = tmp_path / "talk.yaml"
    saved.write_text("seed: 3\n")
    argv = [
        "--config",
        str(saved),
        "--audio",
        str(speech),
        "--ref_video",
        str(ref),
        "--out",
        str(tmp_path / "talk.mp4"),
    ]
    code, err = run_cli(pipeline_main, [*argv, "--overwrite", "--random_weights"], capsys)
    assert_one_line_error(code, err, "is where this run writes its settings")
    assert saved.read_text() == "seed: 3\n"
    argv = _mtov_inputs(tmp_path / "m") + ["--out", str(tmp_path), "--audio", str(tmp_path / "video.mp4")]
    (tmp_path / "video.mp4").write_bytes(b"\x00")
    code, err = run_cli(mtov_main, [*argv, "--overwrite", "--random_weights"], capsys)
    assert_one_line_error(code, err, "is the input")
    assert {p: p.read_bytes() for p in (speech, ref)} == before and (
        tmp_path / "video.mp4"
    ).read_bytes() == b"\x00"


def test_sample_data_keeps_files_already_there(tmp_path, capsys):
    """data.sample_data refuses to replace a file already in --out_dir unless --overwrite, before it
    writes anything."""
    from data.sample_data import main as sample_main

    (tmp_path / "speech.wav").write_bytes(b"mine")
    code, err = run_cli(
        sample_main, ["--out_dir", str(tmp_path), "--video_seconds", "0.2", "--size", "32"], capsys
    )
    assert_one_line_error(code, err, "--overwrite")
    assert (tmp_path / "speech.wav").read_bytes() == b"mine" and not (tmp_path / "reference.png").exists()
    sample_main(["--out_dir", str(tmp_path), "--video_seconds", "0.2", "--size", "32", "--overwrite"])
    assert (tmp_path / "speech.wav").read_bytes()[:4] == b"RIFF" and (tmp_path / "reference.png").is_file()
