"""End-to-end pipeline: tiny random-weights run, stage caching, and the bad-input cases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from data.sample_data import reference_frames, write_reference_image, write_reference_video, write_speech
from data.video import probe
from moditalker.errors import cli_main
from pipeline.cache import WorkCache, stable_key
from pipeline.cli import build_parser
from pipeline.inference import main, resolve_config, run_inference

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "inference_tiny.yaml")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A 3-second speech clip (cut from the bundled one) and a 1-second moving reference video."""
    d = tmp_path_factory.mktemp("inputs")
    return {
        "speech": write_speech(d / "speech3s.wav", seconds=3.0),
        "short": write_speech(d / "short.wav", seconds=0.3),
        "video": write_reference_video(d / "ref.mp4", seconds=1.0),
        "dir": d,
    }


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_config_resolution_flags_and_overrides():
    args = build_parser().parse_args(
        ["--audio", "a.wav", "--ref_video", "v.mp4", "--out", "o.mp4", "--steps", "7", "--seed", "5"]
        + ["--batch_size", "2", "mtov.start_ratio=0.5", "atom.guidance_weight=3.5"]
    )
    cfg = resolve_config(args)
    assert cfg.atom.steps == 7 and cfg.mtov.batch_size == 2 and cfg.mtov.start_ratio == 0.5
    assert cfg.atom.guidance_weight == 3.5
    assert cfg.atom.seed == 5 and cfg.mtov.seed == 5  # null stage seeds follow --seed
    assert cfg.random_weights is False and cfg.assets.atom is None
    tiny = resolve_config(build_parser().parse_args(["--config", TINY, "--audio", "a b.wav"]))
    assert tiny.audio == "a b.wav"
    assert tiny.atom.steps < 50 and tiny.mtov.sampling_timesteps < 100


def test_work_cache_reuses_and_rekeys(tmp_path):
    cache = WorkCache(tmp_path / "work")
    calls = []

    def compute(folder):
        calls.append(folder)
        (folder / "extra.txt").write_text("x")
        return {"a": np.arange(3)}

    out1, k1 = cache.run("stage", {"x": 1}, compute, log=lambda s: None)
    out2, k2 = cache.run("stage", {"x": 1}, compute, log=lambda s: None)
    assert k1 == k2 and len(calls) == 1 and cache.records["stage"].cached
    np.testing.assert_array_equal(out2["a"], [0, 1, 2])
    assert (tmp_path / "work" / f"stage-{k1}" / "extra.txt").is_file()
    _, k3 = cache.run("stage", {"x": 2}, compute, log=lambda s: None)
    assert k3 != k1 and len(calls) == 2 and not cache.records["stage"].cached
    assert stable_key({"a": 1, "b": 2}) == stable_key({"b": 2, "a": 1})

    def boom(folder):
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        cache.run("bad", {"x": 1}, boom, log=lambda s: None)
    assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith((".bad", "bad"))]


# ----------------------------------------------------------------------------- bad inputs
def _base(inputs, out: Path) -> list[str]:
    return ["--audio", str(inputs["speech"]), "--ref_video", str(inputs["video"]), "--out", str(out)]


def test_no_audio_track(inputs, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    argv = ["--audio", str(inputs["video"]), "--ref_video", str(inputs["video"]), "--out", str(out)]
    code, _, err = _run_cli(argv + ["--random_weights", "--config", TINY], capsys)
    _assert_one_line_error(code, err, "no audio track", "ref.mp4")
    assert not out.exists()


def test_unreadable_reference_video(inputs, tmp_path, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(2000))
    out = tmp_path / "o.mp4"
    argv = ["--audio", str(inputs["speech"]), "--ref_video", str(junk), "--out", str(out)]
    code, _, err = _run_cli(argv + ["--random_weights", "--config", TINY], capsys)
    _assert_one_line_error(code, err, "junk.mp4")
    assert not out.exists()


def test_audio_too_short(inputs, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    argv = ["--audio", str(inputs["short"]), "--ref_video", str(inputs["video"]), "--out", str(out)]
    code, _, err = _run_cli(argv + ["--random_weights", "--config", TINY], capsys)
    _assert_one_line_error(code, err, "0.30 s", "0.5")
    assert not out.exists()


def test_unwritable_output(inputs, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    out = blocker / "o.mp4"
    code, _, err = _run_cli(_base(inputs, out) + ["--random_weights", "--config", TINY], capsys)
    _assert_one_line_error(code, err, "not_a_folder")
    assert blocker.read_text().startswith("a file")


def test_existing_output_is_kept(inputs, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"previous result")
    code, _, err = _run_cli(_base(inputs, out) + ["--random_weights", "--config", TINY], capsys)
    _assert_one_line_error(code, err, "--overwrite")
    assert out.read_bytes() == b"previous result"


def test_missing_assets_listed_before_work(inputs, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    empty = tmp_path / "no_checkpoints"
    argv = _base(inputs, out) + [
        f"assets.{k}={empty / k}"
        for k in ("atom", "autoencoder_rgb", "autoencoder_motion", "diffusion_model")
    ]
    argv += [f"assets.bfm_dir={empty / 'BFM'}", f"assets.deep3d={empty / 'd.pth'}"]
    argv += [f"assets.hubert={empty / 'hubert'}", f"assets.face_alignment={empty / 'fa'}"]
    code, stdout, err = _run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: 9 required asset(s) missing")
    named = "\n".join(lines[1:])
    for part in ("atom", "autoencoder_rgb", "autoencoder_motion", "diffusion_model", "BFM_model_front.mat"):
        assert part in named
    assert len(lines) == 10 and all("python -m moditalker.assets check" in line for line in lines[1:])
    assert stdout == "" and not out.exists() and not (tmp_path / "o_work").exists()


def test_cli_module_entry_point(inputs, tmp_path):
    """`python -m pipeline.inference` prints one error line and exits 2 (no traceback)."""
    out = tmp_path / "o.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.inference", "--audio", str(tmp_path / "nope.wav")]
        + ["--ref_video", str(inputs["video"]), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: media file not found: {tmp_path / 'nope.wav'}"]
    assert not out.exists()


def test_sample_reference_frames_move():
    frames = reference_frames(8, size=64)
    assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
    assert np.abs(frames[2].astype(int) - frames[0]).mean() > 1.0  # the head moves


def test_sample_speech_is_cut_exactly(inputs):
    audio, sr = sf.read(inputs["speech"])
    assert sr == 16000 and len(audio) == 48000 and np.abs(audio).max() > 0.1


def test_reference_video_is_silent_25fps(inputs):
    info = probe(inputs["video"])
    assert info["video"]["frames"] == 25 and info["video"]["fps"] == 25.0 and info["audio"] is None


def test_no_face_in_reference(inputs, tmp_path, capsys):
    """A detector that finds no face (injected into data.landmarks) stops the run: one line, exit 2."""
    out = tmp_path / "o.mp4"
    argv = _base(inputs, out) + ["--random_weights", "--config", TINY]

    def no_face(batch):
        return [None] * len(batch)

    def run(argv_):
        return run_inference(
            resolve_config(build_parser().parse_args(argv_)), detector=no_face, progress=False
        )

    with pytest.raises(SystemExit) as exc:
        cli_main(run, argv)
    _, err = capsys.readouterr()
    err_lines = [line for line in err.splitlines() if line.startswith("error")]
    assert exc.value.code == 2 and len(err_lines) == 1
    assert "no face found" in err_lines[0] and "ref.mp4" in err_lines[0]
    assert not out.exists() and not out.with_suffix(".yaml").exists()


# ----------------------------------------------------------------------------- end to end
def _stage_status(result) -> dict[str, bool]:
    return {name: rec.cached for name, rec in result.stages.items()}


def test_end_to_end_tiny_random_weights_and_stage_cache(inputs, tmp_path, capsys, one_thread):
    """3 s speech + 1 s reference video -> 25 fps 256x256 mp4 with 75 +- 1 frames and an audio stream;
    a re-run that changes only MToV settings recomputes only MToV, an AToM change only AToM onwards."""
    out = tmp_path / "result" / "talk.mp4"
    argv = _base(inputs, out) + ["--random_weights", "--config", TINY, "--preview"]
    first = main(argv)
    captured = capsys.readouterr()
    assert "WARNING: --random_weights" in captured.err
    for stage in ("reference", "landmarks", "recon", "hubert", "atom", "align", "mtov", "write", "total"):
        assert stage in captured.out  # per-stage timings printed
    assert not any(_stage_status(first).values())

    info = probe(out)
    video, audio = info["video"], info["audio"]
    assert video["codec"] == "h264" and video["fps"] == 25.0
    assert (video["width"], video["height"]) == (256, 256)
    assert abs(video["frames"] - 75) <= 1
    assert audio is not None and audio["codec"] == "aac"
    assert abs(audio["duration"] - video["frames"] / 25) <= 1 / 25 + 1e-6  # within one frame
    assert "RANDOM WEIGHTS" in info["metadata"]["comment"]
    preview = probe(out.with_name("talk_preview.mp4"))["video"]
    assert (preview["width"], preview["height"], preview["frames"]) == (512, 256, video["frames"])

    saved = OmegaConf.load(out.with_suffix(".yaml"))
    assert saved.random_weights is True and saved.run.n_frames == first.n_frames == 75
    work = tmp_path / "result" / "talk_work"
    assert len(list(work.glob("align-*/landmarks_png/*.png"))) == 75
    assert len(list(work.glob("hubert-*/hubert.npy"))) == 1

    # only an MToV setting changes: everything up to the landmark video is reused
    second = main(argv + ["--overwrite", "mtov.seed=1"])
    status = _stage_status(second)
    assert status.pop("mtov") is False
    assert all(status.values()), status
    assert abs(probe(out)["video"]["frames"] - 75) <= 1

    # an AToM setting changes: AToM, alignment and MToV re-run, the reference/audio stages do not
    third = main(argv + ["--overwrite", "mtov.seed=1", "--steps", "3"])
    status = _stage_status(third)
    assert {k: status[k] for k in ("reference", "landmarks", "recon", "hubert")} == dict.fromkeys(
        ("reference", "landmarks", "recon", "hubert"), True
    )
    assert {k: status[k] for k in ("atom", "align", "mtov")} == dict.fromkeys(
        ("atom", "align", "mtov"), False
    )


def test_end_to_end_reference_photo(inputs, tmp_path, one_thread):
    """--ref_image: one photo, static pose, same output format."""
    photo = tmp_path / "face.png"
    write_reference_image(photo)
    out = tmp_path / "photo.mp4"
    argv = ["--audio", str(inputs["speech"]), "--ref_image", str(photo), "--out", str(out)]
    result = main(argv + ["--random_weights", "--config", TINY, "--device", "cpu", "--clean_work"])
    info = probe(out)
    assert info["video"]["frames"] == result.n_frames == 75
    assert (info["video"]["width"], info["video"]["height"]) == (256, 256) and info["audio"] is not None
    assert not result.work_dir.exists()  # --clean_work: the stage cache is removed after success


def test_end_to_end_from_checkpoint_files(inputs, tmp_path, one_thread):
    """The non-random path: every stage loads its weights from files (tiny networks saved in the
    official layouts, a synthetic BFM), passed as assets.* overrides; only FAN is injected."""
    from AToM.inference import load_atom
    from data.audio import HubertExtractor
    from data.face3d import write_synthetic_bfm
    from data.landmarks import FAN_FILE, S3FD_FILE, template_face_detector
    from data.recon3d import FaceReconstructor
    from MToV.loading import load_mtov

    ck = tmp_path / "ckpt"
    write_synthetic_bfm(ck / "BFM", seed=3)
    rec = FaceReconstructor(bfm_dir=ck / "BFM", random_weights=True, seed=5)
    torch.save({"net_recon": rec.net.state_dict()}, ck / "epoch_20.pth")
    hub = HubertExtractor.random(hidden_size=16, seed=2)
    hub.model.save_pretrained(ck / "hubert")
    hub.feature_extractor.save_pretrained(ck / "hubert")
    (ck / "fa").mkdir()
    for name in (FAN_FILE, S3FD_FILE):  # present for the asset check; FAN itself is injected below
        (ck / "fa" / name).write_bytes(b"stand-in")
    atom_sd = load_atom(
        None, config=REPO / "configs" / "atom_tiny.yaml", random_weights=True
    ).model.state_dict()
    torch.save(
        {"model_state_dict": atom_sd, "ema_state_dict": atom_sd, "optimizer_state_dict": {}}, ck / "atom.pt"
    )
    mtov = load_mtov(None, None, None, config=REPO / "configs" / "mtov_tiny.yaml", random_weights=True)
    torch.save(mtov.ae_rgb.state_dict(), ck / "autoencoder_rgb.pth")
    torch.save(mtov.ae_ldmk.state_dict(), ck / "autoencoder_motion.pth")
    torch.save(mtov.unet.state_dict(), ck / "diffusion_model.pth")

    out = tmp_path / "real.mp4"
    argv = _base(inputs, out) + ["--config", TINY]
    argv += [f"assets.{k}={ck / k}.pth" for k in ("autoencoder_rgb", "autoencoder_motion", "diffusion_model")]
    argv += [f"assets.atom={ck / 'atom.pt'}", f"assets.deep3d={ck / 'epoch_20.pth'}"]
    argv += [
        f"assets.bfm_dir={ck / 'BFM'}",
        f"assets.hubert={ck / 'hubert'}",
        f"assets.face_alignment={ck / 'fa'}",
    ]
    cfg = resolve_config(build_parser().parse_args(argv))
    result = run_inference(cfg, detector=template_face_detector, progress=False, log=lambda s: None)
    info = probe(out)
    assert info["video"]["frames"] == result.n_frames == 75 and info["audio"]["codec"] == "aac"
    assert "RANDOM" not in info["metadata"]["comment"]
    assert OmegaConf.load(out.with_suffix(".yaml")).random_weights is False
    # the features really come from the saved HuBERT folder
    feats = np.load(next((tmp_path / "real_work").glob("hubert-*/hubert.npy")))
    assert feats.shape == (2 * 75, 16)


def test_silent_audio(inputs, tmp_path, capsys):
    silent = tmp_path / "silence.wav"
    sf.write(silent, np.zeros(32000, np.float32), 16000)
    out = tmp_path / "o.mp4"
    argv = ["--audio", str(silent), "--ref_video", str(inputs["video"]), "--out", str(out)]
    code, _, err = _run_cli(argv + ["--random_weights", "--config", TINY], capsys)
    _assert_one_line_error(code, err, "silent", "silence.wav")
    assert not out.exists() and not (tmp_path / "o_work").exists()


def test_inference_yaml_spells_out_the_defaults():
    """configs/inference.yaml and pipeline.inference.DEFAULTS hold the same tree and values."""
    from pipeline.inference import DEFAULTS

    on_disk = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "inference.yaml"))
    assert on_disk == DEFAULTS


@pytest.mark.parametrize(
    "extra,message",
    [
        (["atom.stesp=10"], "unknown setting atom.stesp; see configs/inference.yaml"),
        (["nonsense=3"], "unknown setting nonsense; see configs/inference.yaml"),
        (["atom.steps=abc"], "atom.steps must be an integer, got 'abc'"),
        (["seed=abc"], "seed must be an integer"),
        (["--seed", "-1"], "seed must be in 0..2**63-1"),
        (["atom=3"], "atom must be a section of settings"),
        (["--steps", "0"], "atom.steps must be >= 1"),
        (["--guidance", "nan"], "atom.guidance_weight must be a finite number"),
        (["--batch_size", "0"], "mtov.batch_size must be >= 1"),
        (["--mtov_steps", "0"], "mtov.sampling_timesteps must be >= 1"),
        (["--mtov_steps", "3"], "runs no denoising step"),
        (["mtov.precision=foo"], "mtov.precision must be one of"),
        (["size=0"], "size must be >= 32"),
        (["min_audio_seconds=abc"], "min_audio_seconds must be a number"),
        (["output.preset=foo"], "output.preset must be an x264 preset"),
        (["output.crf=99"], "output.crf must be in 0..51"),
        (["--config", "TEXT"], "is not a config for this command"),
    ],
)
def test_bad_settings_stop_before_any_work(inputs, tmp_path, capsys, extra, message):
    """Each was a traceback (some only after the reference, AToM or MToV stages had run), or silently
    ignored (unknown keys, a text file as --config), or exit 0 with a noise video (mtov steps 0)."""
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a config\n")
    out = tmp_path / "o.mp4"
    argv = _base(inputs, out) + ["--random_weights", "--config", TINY]
    code, stdout, err = _run_cli(argv + [str(text) if e == "TEXT" else e for e in extra], capsys)
    _assert_one_line_error(code, err, message)
    assert stdout == "" and not out.exists() and not (tmp_path / "o_work").exists()
    assert not out.with_suffix(".yaml").exists()


def test_undecodable_reference_stops_before_any_work(inputs, tmp_path, capsys):
    """A video whose headers read but whose frames do not decode failed only in the reference stage,
    after the work folder was made; now it is caught with the other cheap checks."""
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(inputs["video"].read_bytes()[:2000])  # moov (faststart) but no frame data
    out = tmp_path / "o.mp4"
    argv = ["--audio", str(inputs["speech"]), "--ref_video", str(cut), "--out", str(out)]
    code, _, err = _run_cli(argv + ["--random_weights", "--config", TINY], capsys)
    _assert_one_line_error(code, err, "cannot decode", "cut.mp4")
    assert not out.exists() and not (tmp_path / "o_work").exists()


def test_flag_values_are_not_parsed_as_yaml():
    """`--audio "it's a.wav"` was a YAML error (quote inside quotes), `--work_dir 123` the integer 123."""
    args = build_parser().parse_args(["--audio", "it's a.wav", "--work_dir", "123", "--device", "cuda:0"])
    cfg = resolve_config(args)
    assert cfg.audio == "it's a.wav" and cfg.work_dir == "123" and cfg.device == "cuda:0"


def test_every_default_setting_has_a_check():
    """check_settings looks every leaf of DEFAULTS up in pipeline.settings.SETTINGS (both derived from
    one schema): every setting has its type and check."""
    from pipeline.inference import DEFAULTS
    from pipeline.settings import FREE_FORM, SETTINGS

    def leaves(node: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in node.items():
            name = f"{prefix}{k}"
            out |= leaves(v, f"{name}.") if isinstance(v, dict) and name not in FREE_FORM else {name}
        return out

    assert leaves(DEFAULTS) == set(SETTINGS)
    assert set(FREE_FORM) <= set(SETTINGS)
    assert all(s.type is not None for k, s in SETTINGS.items() if k not in FREE_FORM)
