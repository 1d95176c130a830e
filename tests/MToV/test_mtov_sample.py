"""MToV sampling (MToV.generate, MToV.conditions, the MToV.sample CLI): batched == one clip at a time,
any length, encode-once, the stage timer, the conditions, CLI and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moditalker.errors import UserError
from MToV.generate import SamplingOptions, generate_video
from MToV.loading import load_mtov, precision_plan
from MToV.sample import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "mtov_tiny.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to a shared CPU


@pytest.fixture(scope="module")
def models():
    m = load_mtov(None, None, None, config=TINY, random_weights=True)
    g = torch.Generator().manual_seed(5)
    for p in m.unet.parameters():  # give the zero-initialised output layers weights: eps != 0
        if p.abs().sum() == 0:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _inputs(t: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lv = np.zeros((t, 3, size, size), np.uint8)
    lv[:, :, rng.integers(0, size, 20), rng.integers(0, size, 20)] = 255
    masked = rng.integers(0, 256, (t, 3, size, size), dtype=np.uint8)
    masked[:, :, size // 2 :] = 0
    ident = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
    return lv, masked, ident


def _mark_frames(lv: np.ndarray) -> None:
    """Make every frame distinct: a dot in row 0 at column (frame index mod width)."""
    for i in range(lv.shape[0]):
        lv[i, :, 0, i % lv.shape[-1]] = 255


def test_batched_equals_single_any_length(models):
    clip = models.clip_frames
    t = 2 * clip + 3  # last clip partial: padded and trimmed
    lv, masked, ident = _inputs(t, models.resolution)
    kw = dict(sampling_timesteps=8, progress=False, seed=3)
    one = generate_video(models, lv, masked, ident, batch_size=1, **kw)
    many = generate_video(models, lv, masked, ident, batch_size=3, **kw)
    assert one.shape == (t, 3, models.resolution, models.resolution) and one.dtype == np.uint8
    assert np.abs(one.astype(int) - many).max() <= 1
    assert one.std() > 1  # not a constant image
    other_seed = generate_video(models, lv, masked, ident, batch_size=3, **dict(kw, seed=4))
    assert np.abs(other_seed.astype(int) - many).mean() > 1
    # the first clip does not depend on the frames of later clips
    short = generate_video(models, lv[:clip], masked[:clip], ident, batch_size=1, **kw)
    assert np.abs(short.astype(int) - one[:clip]).max() <= 1


def _spy_encodes(models, monkeypatch) -> dict[str, list[int]]:
    """Record the batch size of every encode by the autoencoders the default precision runs (``auto``:
    on most CPUs their int8 copies, made once per loaded model)."""
    calls: dict[str, list[int]] = {"rgb": [], "ldmk": []}
    for name, ae in zip(("rgb", "ldmk"), models.autoencoders(precision_plan("auto", models.device))):
        extract = ae.extract
        monkeypatch.setattr(
            ae, "extract", lambda x, name=name, extract=extract: calls[name].append(x.shape[0]) or extract(x)
        )
    return calls


def test_encodes_reference_once_and_only_what_is_needed(models, monkeypatch):
    clip = models.clip_frames
    t = 3 * clip
    lv, masked, ident = _inputs(t, models.resolution, seed=1)
    _mark_frames(lv)  # landmark clips differ from each other (as real ones do)
    calls = _spy_encodes(models, monkeypatch)
    decodes = []
    for ae in (models.ae_ldmk, models.autoencoders(precision_plan("auto", models.device))[1]):
        monkeypatch.setattr(ae, "decode", lambda z: decodes.append(z.shape[0]))
    generate_video(models, lv, masked, ident, batch_size=2, sampling_timesteps=8, progress=False)
    # reference once, then each masked clip once; on the CPU the autoencoders take one clip per call
    assert calls["rgb"] == [1, 1, 1, 1]
    assert calls["ldmk"] == [1, 1, 1]
    assert decodes == []  # the landmark latents are never decoded


def test_repeated_clips_encoded_once_same_result(models, monkeypatch):
    """A still reference (every masked clip the same) and repeated landmark clips: each distinct clip
    is encoded once, and the video equals the one made with every clip encoded."""
    import MToV.generate as gen

    clip = models.clip_frames
    t = 4 * clip - 2
    lv, masked, ident = _inputs(t, models.resolution, seed=2)
    masked[:] = masked[0]  # a still image: all masked clips equal, the padded last one too
    _mark_frames(lv)
    lv[2 * clip :] = lv[: t - 2 * clip]  # clip 2 repeats clip 0; the partial clip 3 (padded) does not
    kw = dict(batch_size=3, sampling_timesteps=8, progress=False, seed=1)
    calls = _spy_encodes(models, monkeypatch)
    cached = generate_video(models, lv, masked, ident, **kw)
    assert calls["rgb"] == [1, 1]  # the reference, then the one distinct masked clip
    assert calls["ldmk"] == [1, 1, 1]  # clips 0 and 1 (2 = 0), then clip 3, one per call on the CPU

    class NoCache(gen.ClipLatentCache):
        def __call__(self, ae, clips, keys):
            return self.extract(ae, clips)

    monkeypatch.setattr(gen, "ClipLatentCache", NoCache)
    calls["rgb"].clear(), calls["ldmk"].clear()
    every = generate_video(models, lv, masked, ident, **kw)
    assert calls["rgb"] == [1] * 5 and calls["ldmk"] == [1] * 4  # every clip, one per call on the CPU
    assert cached.std() > 1 and np.abs(cached.astype(int) - every).max() <= 1


def test_use_last_as_reference_and_resizing(models):
    clip = models.clip_frames
    size = 2 * models.resolution
    lv, masked, ident = _inputs(2 * clip, size, seed=2)
    kw = dict(sampling_timesteps=8, progress=False, batch_size=2)
    base = generate_video(models, lv, masked, ident, **kw)
    carried = generate_video(models, lv, masked, ident, use_last_as_reference=True, **kw)
    assert base.shape == carried.shape == (2 * clip, 3, size, size)
    assert np.abs(base[:clip].astype(int) - carried[:clip]).max() <= 1  # clip 0 uses the identity frame
    assert np.abs(base[clip:].astype(int) - carried[clip:]).mean() > 0.5


def test_timer_records_the_stages_with_its_clock(models):
    """``timer`` replaces the wall clock: a fake clock that ticks once per reading makes every timed
    block last exactly 1, so the recorded values count the blocks of each stage."""
    from moditalker.timing import StageTimer
    from MToV.generate import generate_video_original

    clip = models.clip_frames
    lv, masked, ident = _inputs(3 * clip, models.resolution, seed=4)
    ticks = iter(range(10**6))

    def fake_clock() -> float:
        return float(next(ticks))

    timings: dict[str, float] = {}
    kw = dict(progress=False, return_float=True)
    options = SamplingOptions(batch_size=2, sampling_timesteps=8)
    generate_video(models, lv, masked, ident, options, timer=StageTimer(timings, clock=fake_clock), **kw)
    # the reference encode, then per batch of clips (2 batches): encode, unet, decode
    assert timings == {"encode": 3.0, "unet": 2.0, "decode": 2.0}
    original: dict[str, float] = {}
    timer = StageTimer(original, clock=fake_clock)
    generate_video_original(models, lv, masked, ident, masked, options, timer=timer, **kw)
    assert original == {"encode": 3.0, "unet": 3.0, "decode": 3.0}  # one clip at a time


def test_sampling_options_and_training_imports_no_cli():
    """Keyword settings of generate_video replace single fields of its options; a section of a config
    gives the options as their types; unknown names are refused; the trainers import no CLI module."""
    import MToV.conditions
    from MToV.generate import SamplingOptions

    opt = SamplingOptions.from_config(
        {"batch_size": 2, "eta": 1, "seed": 3, "config": None}, precision="fp32"
    )
    assert opt == SamplingOptions(batch_size=2, eta=1.0, seed=3, precision="fp32")
    assert isinstance(opt.eta, float) and opt.clips_per_batch == 2
    # the config's sampler settings are the options' plain fields, with their types
    from MToV.generate import SETTING_TYPES
    from MToV.loading import MODEL_DEFAULTS

    assert set(SETTING_TYPES) == set(MODEL_DEFAULTS["sample"])
    assert SETTING_TYPES["start_ratio"] is float and SETTING_TYPES["use_last_as_reference"] is bool
    with pytest.raises(TypeError, match="stesp"):
        generate_video(None, np.zeros((1, 3, 8, 8), np.uint8), None, None, stesp=3)
    assert callable(MToV.conditions.build_conditions)
    code = (
        "import sys, MToV.train_diffusion, MToV.train_autoencoder; "
        "assert 'MToV.sample' not in sys.modules and 'MToV.conditions' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_conditions_from_reference_and_landmarks(tmp_path):
    """build_conditions: the reference played back and forth, masked from the nose down (nose from
    --ref_landmarks or the aligned landmarks), the identity frame; read_landmark_input of a PNG folder
    and read_reference of a frame folder through data.video's one frame-folder reader."""
    from data.video import write_frame_folder
    from MToV.conditions import build_conditions, read_landmark_input, read_reference

    ref = _write_reference(tmp_path / "ref", 3, hw=(40, 40))
    assert np.array_equal(read_reference(ref_frames=tmp_path / "ref"), ref)
    lm = np.full((5, 68, 2), 10.0, np.float32)
    lm[:, 33, 1] = 20.0  # nose base at row 20 of 40
    video, lm_out = read_landmark_input(_save(tmp_path / "lm.npy", lm), (40, 40), 16)
    assert video.shape == (5, 3, 16, 16) and video.dtype == np.uint8 and np.array_equal(lm_out, lm)
    cond = build_conditions(ref, video, 16, landmarks=lm, identity_frame=2)
    assert cond.masked_frames.shape == (5, 3, 16, 16) and cond.identity_frame.shape == (3, 16, 16)
    assert cond.masked_frames[:, :, 8:].max() == 0 and cond.masked_frames[:, :, :7].max() > 0
    # frames 0 1 2 1 0: the masked frame 3 is reference frame 1, frame 4 reference frame 0
    assert np.array_equal(cond.masked_frames[3], cond.masked_frames[1])
    assert np.array_equal(cond.masked_frames[4], cond.masked_frames[0])
    by_ref = build_conditions(ref, video, 16, ref_landmarks=_save(tmp_path / "ref_lm.npy", lm[:3]))
    assert np.array_equal(by_ref.masked_frames, cond.masked_frames)
    write_frame_folder(tmp_path / "png", video, channels_first=True)
    png_video, none = read_landmark_input(tmp_path / "png", (40, 40), 16)
    assert none is None and np.array_equal(png_video, video)
    with pytest.raises(UserError, match="--ref_landmarks"):
        build_conditions(ref, png_video, 16)
    with pytest.raises(UserError, match=r"expected \[3, 68, 2\]"):
        build_conditions(ref, video, 16, ref_landmarks=lm)
    with pytest.raises(UserError, match="--identity_frame 3 outside"):
        build_conditions(ref, video, 16, landmarks=lm, identity_frame=3)
    with pytest.raises(UserError, match="reference frames folder not found"):
        read_reference(ref_frames=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        read_landmark_input(tmp_path / "empty", (40, 40), 16)


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def test_bad_inputs_raise_user_errors(models):
    lv, masked, ident = _inputs(4, models.resolution)
    with pytest.raises(UserError, match="same shape"):
        generate_video(models, lv, masked[:3], ident, progress=False)
    with pytest.raises(UserError, match="identity_frame"):
        generate_video(models, lv, masked, ident[:, :5], progress=False)
    with pytest.raises(UserError, match="landmark_video"):
        generate_video(models, lv[0], masked, ident, progress=False)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_mtov(str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), str(tmp_path / "c.pth"), config=TINY)
    m = load_mtov(None, None, None, config=TINY, random_weights=True)
    torch.save(m.ae_rgb.state_dict(), tmp_path / "ae.pth")
    torch.save({k: v[..., :1] if v.ndim else v for k, v in m.unet.state_dict().items()}, tmp_path / "bad.pth")
    torch.save(m.unet.diffusion_model.state_dict(), tmp_path / "bare.pth")  # no diffusion_model. prefix
    with pytest.raises(UserError, match="does not match"):
        load_mtov(str(tmp_path / "ae.pth"), str(tmp_path / "ae.pth"), str(tmp_path / "bad.pth"), config=TINY)
    ok = load_mtov(
        str(tmp_path / "ae.pth"), str(tmp_path / "ae.pth"), str(tmp_path / "bare.pth"), config=TINY
    )
    assert ok.unet.diffusion_model.model_channels == 32


def _write_reference(folder: Path, n: int, hw=(40, 48)) -> np.ndarray:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.png")
    return frames


def test_cli_end_to_end_random_weights(tmp_path, capsys):
    from data.video import probe

    _write_reference(tmp_path / "ref", 5)
    lm = np.random.default_rng(1).uniform(5, 35, (11, 68, 2)).astype(np.float32)
    np.save(tmp_path / "aligned.npy", lm)
    out = tmp_path / "out"
    args = [
        "--landmarks",
        str(tmp_path / "aligned.npy"),
        "--ref_frames",
        str(tmp_path / "ref"),
        "--out",
        str(out),
        "--config",
        TINY,
        "--random_weights",
        "--device",
        "cpu",
        "--no_progress",
        "--save_frames",
        "--batch_size",
        "2",
    ]
    res = main(args)
    assert res["frames"] == 11
    # precision auto on tiny networks: the capability rule (full-size ones are measured on the CPU)
    assert res["precision_used"] == precision_plan("auto", torch.device("cpu")).per_network()
    assert "WARNING: --random_weights: the MToV autoencoders and UNet are RANDOMLY" in capsys.readouterr().err
    info = probe(out / "video.mp4")
    assert json.dumps(info)  # probe result is plain data
    assert (info["video"]["width"], info["video"]["height"]) == (256, 256)  # --size 256 by default
    assert len(list((out / "frames").glob("*.png"))) == 11
    assert (out / "config.yaml").is_file()
    with pytest.raises(UserError, match="already exists"):
        main(args)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--unet", "/nonexistent/diffusion_model.pth"], "not found"),
        (["--random_weights", "--landmarks_bad"], "landmarks must be"),
    ],
)
def test_cli_errors_exit_2(tmp_path, extra, message):
    _write_reference(tmp_path / "ref", 2)
    good = tmp_path / "aligned.npy"
    np.save(good, np.zeros((3, 68, 2), np.float32))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 5, 2), np.float32))
    lm = bad if "--landmarks_bad" in extra else good
    extra = [e for e in extra if e != "--landmarks_bad"]
    cmd = [
        sys.executable,
        "-m",
        "MToV.sample",
        "--landmarks",
        str(lm),
        "--ref_frames",
        str(tmp_path / "ref"),
        "--out",
        str(tmp_path / "o"),
        "--config",
        TINY,
        "--device",
        "cpu",
        "--no_progress",
        *extra,
    ]
    if "--unet" in extra:
        cmd += ["--ae_rgb", "/nonexistent/a.pth", "--ae_ldmk", "/nonexistent/b.pth"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_sampler_that_would_not_denoise_is_refused(models):
    """0, 1 or 3 DDIM steps put no step below t = 250: the output was the noised reference, exit 0."""
    lv, masked, ident = _inputs(2, models.resolution)
    for steps in (0, 1, 3):
        with pytest.raises(UserError, match="sampling_timesteps"):
            generate_video(models, lv, masked, ident, sampling_timesteps=steps, progress=False)
    with pytest.raises(UserError, match="start_ratio"):
        generate_video(models, lv, masked, ident, start_ratio=0.0005, progress=False)
    with pytest.raises(UserError, match="eta"):
        generate_video(models, lv, masked, ident, eta=5.0, progress=False)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "0"], "sampling_timesteps must be in 1..1000, got 0"),
        (["--steps", "1"], "runs no denoising step"),
        (["--steps", "-5"], "sampling_timesteps must be in 1..1000"),
        (["--start_ratio", "0.0005"], "nothing to denoise"),
        (["sample.eta=5"], "eta must be in [0, 1]"),
        (["sample.seed=abc"], "sample.seed must be an integer"),
        (["sample.eta=abc"], "sample.eta must be a number, got 'abc'"),
        (["sample.use_last_as_reference=3"], "sample.use_last_as_reference must be true/false, got 3"),
        (["sample.foo=1"], "unknown sample setting foo; known"),
        (["sample=3"], "sample must be a mapping"),
        (["--fps", "0"], "--fps must be a positive number"),
        (["--fps", "nan"], "--fps must be a positive number"),
        (["--audio", "TEXT"], "cannot read audio"),
    ],
)
def test_cli_bad_settings_fail_before_sampling(tmp_path, capsys, extra, message):
    """Each of these was a traceback, or exit 0 with a noise video, or (--audio) an error only after
    the whole sampling; now one line, exit 2, before any network is built, nothing written."""
    from moditalker.errors import cli_main

    _write_reference(tmp_path / "ref", 2)
    np.save(tmp_path / "aligned.npy", np.full((3, 68, 2), 20.0, np.float32))
    (tmp_path / "text.wav").write_text("not audio")
    extra = [str(tmp_path / "text.wav") if e == "TEXT" else e for e in extra]
    out = tmp_path / "out"
    argv = ["--landmarks", str(tmp_path / "aligned.npy"), "--ref_frames", str(tmp_path / "ref")]
    argv += ["--out", str(out), "--config", TINY, "--random_weights", "--no_progress", *extra]
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert not (out / "video.mp4").exists() and not (out / "config.yaml").exists()
