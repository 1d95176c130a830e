"""AToM inference: loading (official layout, strict), long/short audio, determinism, CLI and its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from AToM.common import as_config, build_diffusion
from AToM.inference import generate_landmarks, load_atom, main, window_starts
from moditalker.errors import UserError, cli_main

REPO = Path(__file__).resolve().parents[2]


# tiny models: one thread is fastest and does not fight other test processes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = REPO / "configs" / "atom_tiny.yaml"


def tiny_cfg():
    cfg = OmegaConf.load(TINY)
    cfg.model.seq_len = cfg.diffusion.horizon = 8
    cfg.sample.overlap = 2
    return as_config({k: cfg[k] for k in ("model", "diffusion", "sample")})


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint in the official layout (+ our config entry)."""
    cfg = tiny_cfg()
    torch.manual_seed(3)
    d = build_diffusion(cfg)
    ema = build_diffusion(cfg).model
    path = tmp_path_factory.mktemp("atom") / "atom_tiny.pt"
    torch.save(
        {
            "model_state_dict": d.model.state_dict(),
            "ema_state_dict": ema.state_dict(),
            "optimizer_state_dict": {},
            "config": OmegaConf.to_container(cfg),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def bfm_dir(tmp_path_factory) -> Path:
    from data.face3d import write_synthetic_bfm

    folder = tmp_path_factory.mktemp("bfm")
    write_synthetic_bfm(folder, seed=0)
    return folder


def _inputs(dim: int, n_audio: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hub = rng.normal(size=(n_audio, dim)).astype(np.float32)
    kms = rng.normal(size=(68, 3)).astype(np.float32) * 0.5
    ref = kms + rng.normal(size=(68, 3)).astype(np.float32) * 0.02
    return hub, ref, kms


def test_window_starts_cover_and_overlap():
    assert window_starts(5, 8, 2) == [0]
    assert window_starts(8, 8, 2) == [0]
    starts = window_starts(30, 8, 2)
    assert starts[0] == 0 and starts[-1] == 22
    assert all(b - a <= 6 for a, b in zip(starts, starts[1:]))


def test_load_atom_strict_and_ema(tiny_ckpt):
    d = load_atom(str(tiny_ckpt))
    e = load_atom(str(tiny_ckpt), ema=True)
    sd = torch.load(tiny_ckpt, weights_only=True)
    for k, v in sd["model_state_dict"].items():
        assert torch.equal(d.model.state_dict()[k], v)
    for k, v in sd["ema_state_dict"].items():
        assert torch.equal(e.model.state_dict()[k], v)
    assert d.horizon == 8 and not d.training


def test_load_atom_module_prefix(tiny_ckpt, tmp_path):
    sd = torch.load(tiny_ckpt, weights_only=True)
    sd["model_state_dict"] = {f"module.{k}": v for k, v in sd["model_state_dict"].items()}
    p = tmp_path / "ddp.pt"
    torch.save(sd, p)
    d = load_atom(p)
    assert torch.equal(d.model.final_layer.weight, sd["model_state_dict"]["module.final_layer.weight"])


def test_load_atom_mismatched_checkpoint(tiny_ckpt):
    with pytest.raises(UserError, match="does not match"):
        load_atom(tiny_ckpt, config={"model": {"seq_len": 8, "latent_dim": 48}, "diffusion": {"horizon": 8}})
    with pytest.raises(UserError, match="not found"):
        load_atom("/nonexistent/atom.pt")
    with pytest.raises(UserError, match="no AToM checkpoint"):
        load_atom(None)


@pytest.mark.parametrize("n_audio", [7, 16, 17, 61])
def test_generate_any_length(tiny_ckpt, n_audio):
    d = load_atom(tiny_ckpt)
    hub, ref, kms = _inputs(d.model.cond_feature_dim, n_audio)
    out = generate_landmarks(d, hub, ref, kms, steps=2, seed=1, progress=False, overlap=3)
    assert out.shape == (n_audio // 2, 68, 3) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_every_step_count_gives_finite_landmarks():
    """At 5 DDIM steps (eta 1) the first step's noise coefficient rounds to sqrt(-6e-8) in float32: the
    original's sampler (and this one, before the clamp) returned NaN for any network at that count."""
    from AToM.diffusion import ddim_times

    d = load_atom(None, str(REPO / "configs" / "atom_tiny.yaml"), random_weights=True)
    for steps in (4, 5, 6):
        for time, nxt in ddim_times(len(d.alphas_cumprod), steps):
            if nxt >= 0:  # the coefficient as the sampler computes it
                a, an = d.alphas_cumprod[time], d.alphas_cumprod[nxt]
                sigma = ((1 - a / an) * (1 - an) / (1 - a)).sqrt()
                assert steps != 5 or time != 999 or float(1 - an - sigma**2) < 0  # the rounding is real
    rng = np.random.default_rng(0)
    hub = rng.standard_normal((40, d.model.cond_feature_dim)).astype(np.float32)
    ref = (rng.standard_normal((68, 3)) * 0.1).astype(np.float32)
    out = generate_landmarks(d, hub, ref, np.zeros((68, 3), np.float32), steps=5, seed=1, progress=False)
    assert np.isfinite(out).all() and out.std() > 0


def test_generate_deterministic_and_reference_space(tiny_ckpt):
    d = load_atom(tiny_ckpt)
    hub, ref, kms = _inputs(d.model.cond_feature_dim, 40)
    a = generate_landmarks(d, hub, ref, kms, steps=4, seed=5, progress=False)
    b = generate_landmarks(d, hub, ref, kms, steps=4, seed=5, progress=False)
    c = generate_landmarks(d, hub, ref, kms, steps=4, seed=6, progress=False)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4
    # residuals are clamped to [-1, 1] in idexp units, so landmarks stay within 0.1 of the reference
    # (window 0) -- this holds only if the reference was converted to idexp space first.
    assert window_starts(20, 8, 2)[1] == 6  # frames 0..5 come from window 1 alone
    assert np.abs(a[:6] - ref).max() <= 0.1 + 1e-5


def test_generate_single_window_matches_ddim_sample(tiny_ckpt):
    """Exactly one window: the result is ddim_sample's residual + converted reference."""
    d = load_atom(tiny_ckpt)
    hub, ref, kms = _inputs(d.model.cond_feature_dim, 16)
    out = generate_landmarks(d, hub, ref, kms, steps=5, eta=0.5, guidance_weight=3.0, seed=9, progress=False)
    ref_idexp = torch.from_numpy((ref - kms).reshape(-1) * 10)
    res = d.ddim_sample(
        (1, 8, 204),
        ref_idexp.expand(1, 8, -1),
        None,
        torch.from_numpy(hub)[None],
        steps=5,
        eta=0.5,
        guidance_weight=3.0,
        generator=torch.Generator().manual_seed(9),
    )
    expect = (res[0] + ref_idexp).reshape(8, 68, 3).numpy() / 10 + kms
    np.testing.assert_allclose(out, expect, atol=1e-5)


def test_long_audio_windows_chain(tiny_ckpt):
    """Frames before window 2 are window 1's; the overlap is a cross-fade; the rest is window 2."""
    d = load_atom(tiny_ckpt)
    assert window_starts(12, 8, 4) == [0, 4]
    hub, ref, kms = _inputs(d.model.cond_feature_dim, 24)  # 12 frames: windows at 0 and 4
    out = generate_landmarks(d, hub, ref, kms, steps=4, seed=2, progress=False, overlap=4)
    first = generate_landmarks(d, hub[:16], ref, kms, steps=4, seed=2, progress=False, overlap=4)
    np.testing.assert_allclose(out[:4], first[:4], atol=1e-6)
    assert np.abs(out[4:8] - first[4:8]).max() > 1e-6  # blended with window 2's estimate
    assert np.isfinite(out).all()


def test_guidance_modes_give_the_same_landmarks(monkeypatch):
    """guidance_mode only changes the call pattern: batched, two_pass and original (two full passes
    per step, conditions re-encoded each time) give the same landmarks with the same noise, over two
    windows (so inpainting runs too); random weights of configs/atom_tiny.yaml."""
    d = load_atom(None, TINY, random_weights=True)
    w, steps = d.horizon, 3
    hub, ref, kms = _inputs(d.model.cond_feature_dim, 2 * (w + 5), seed=3)  # two windows
    n_windows = len(window_starts(w + 5, w, int(d.atom_config.sample.overlap)))
    assert n_windows == 2
    calls = {"encode": 0, "decode": 0, "forward": 0}
    for name, key in (("encode_conditions", "encode"), ("decode", "decode"), ("forward", "forward")):
        method = getattr(d.model, name)

        def counted(*a, _method=method, _key=key, **k):
            calls[_key] += 1
            return _method(*a, **k)

        monkeypatch.setattr(d.model, name, counted)
    out, counts = {}, {}
    for mode in ("auto", "batched", "two_pass", "original"):
        calls.update(encode=0, decode=0, forward=0)
        out[mode] = generate_landmarks(
            d, hub, ref, kms, steps=steps, seed=4, progress=False, guidance_mode=mode
        )
        counts[mode] = dict(calls)
    per_step = n_windows * steps
    assert counts["batched"] == {"encode": 2 * n_windows, "decode": per_step, "forward": 0}
    assert counts["two_pass"] == {"encode": 2 * n_windows, "decode": 2 * per_step, "forward": 0}
    assert counts["auto"] == counts["two_pass"]  # on the CPU, auto runs two passes
    assert counts["original"] == {"encode": 2 * per_step, "decode": 2 * per_step, "forward": 2 * per_step}
    assert out["auto"].shape == (w + 5, 68, 3) and np.abs(out["auto"] - ref).max() > 1e-3
    for mode in ("batched", "two_pass", "original"):
        np.testing.assert_allclose(out[mode], out["auto"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["two_pass"], out["auto"])
    # On the CPU AToM runs PyTorch's math attention (moditalker.device.original_attention), which is the
    # arithmetic of the benchmark's faithful mode: the default path equals it bit for bit (the fused
    # kernels moved landmarks by about 1e-7, enough to move a rendered landmark by one pixel).
    with sdpa_kernel(SDPBackend.MATH):
        faithful = generate_landmarks(
            d, hub, ref, kms, steps=steps, seed=4, progress=False, guidance_mode="original"
        )
    np.testing.assert_array_equal(faithful, out["auto"])
    with pytest.raises(UserError, match="guidance_mode"):
        generate_landmarks(d, hub, ref, kms, steps=1, progress=False, guidance_mode="fast")


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda h, r: (h[:, :5], r), "must be"),
        (lambda h, r: (h[:1], r), "too short"),
        (lambda h, r: (np.where(np.arange(h.size).reshape(h.shape) == 3, np.nan, h), r), "NaN"),
        (lambda h, r: (h, r[:60]), r"\[68, 3\]"),
    ],
)
def test_generate_bad_inputs(tiny_ckpt, bad, match):
    d = load_atom(tiny_ckpt)
    hub, ref, kms = _inputs(d.model.cond_feature_dim, 20)
    h, r = bad(hub, ref)
    with pytest.raises(UserError, match=match):
        generate_landmarks(d, h, r, kms, steps=2, progress=False)


def test_cli_end_to_end(tiny_ckpt, bfm_dir, tmp_path):
    hub, ref, _ = _inputs(16, 21)
    np.save(tmp_path / "h.npy", hub)
    np.save(tmp_path / "r.npy", ref)
    out = tmp_path / "out" / "lm.npy"
    args = ["--hubert", str(tmp_path / "h.npy"), "--ref_lm3d", str(tmp_path / "r.npy"), "--out", str(out)]
    args += ["--checkpoint", str(tiny_ckpt), "--bfm_dir", str(bfm_dir), "--steps", "3", "--device", "cpu"]
    main([*args, "--png_dir", str(tmp_path / "png"), "--ema"])
    lm = np.load(out)
    assert lm.shape == (10, 68, 3) and lm.dtype == np.float32
    assert len(list((tmp_path / "png").glob("*.png"))) == 10
    assert out.with_suffix(".yaml").is_file()
    with pytest.raises(UserError, match="already exists"):
        main(args)
    main([*args, "--overwrite", "--ema"])  # same seed -> same result
    np.testing.assert_array_equal(np.load(out), lm)
    # a [T, 68, 3] landmark file (a pipeline work folder's reference_lm3d.npy): --ref_frame picks the frame
    frames = np.stack([ref + 0.5, ref, ref - 0.5])
    np.save(tmp_path / "frames.npy", frames)
    picked = [*args, "--ref_lm3d", str(tmp_path / "frames.npy"), "--overwrite", "--ema"]
    with pytest.raises(UserError, match="holds 3 frames.*--ref_frame"):
        main(picked)
    with pytest.raises(UserError, match="--ref_frame 3 is outside the 3 frames"):
        main([*picked, "--ref_frame", "3"])
    main([*picked, "--ref_frame", "1"])  # frame 1 is the reference of the first run: the same landmarks
    np.testing.assert_array_equal(np.load(out), lm)
    main([*picked, "--ref_frame", "0"])
    assert not np.array_equal(np.load(out), lm)
    with pytest.raises(UserError, match="--ref_frame takes a \\[T, 68, 3\\]"):
        main([*args, "--overwrite", "--ref_frame", "0"])


def test_cli_errors_one_line_exit_2(tiny_ckpt, bfm_dir, tmp_path, capsys):
    hub, ref, _ = _inputs(16, 21)
    np.save(tmp_path / "h.npy", hub)
    np.save(tmp_path / "bad_ref.npy", ref[:10])
    np.save(tmp_path / "r.npy", ref)
    h, r, bad_r = (str(tmp_path / n) for n in ("h.npy", "r.npy", "bad_ref.npy"))
    base = ["--out", str(tmp_path / "o.npy"), "--bfm_dir", str(bfm_dir), "--device", "cpu"]
    ck = str(tiny_ckpt)
    cases = [
        (["--hubert", str(tmp_path / "missing.npy"), "--ref_lm3d", r, "--checkpoint", ck], "not found"),
        (["--hubert", h, "--ref_lm3d", bad_r, "--checkpoint", ck], "[68, 3]"),
        (["--hubert", r, "--ref_lm3d", r, "--checkpoint", ck], "HuBERT features must be"),
        (
            ["--hubert", h, "--ref_lm3d", r, "--checkpoint", str(tmp_path / "nope.pt")],
            "moditalker.assets check",
        ),
        (["--hubert", h, "--ref_lm3d", r, "--checkpoint", h], "cannot read AToM checkpoint"),
        (["--hubert", h, "--ref_lm3d", r, "--checkpoint", ck, "--bfm_dir", str(tmp_path)], "BFM_model_front"),
        (["--hubert", h, "--ref_lm3d", r, "--checkpoint", ck, "--steps", "0"], "steps must be"),
        (["--hubert", h, "--ref_lm3d", r, "--checkpoint", ck, "--overlap", "8"], "overlap must be"),
    ]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as exc:
            cli_main(main, [*base, *extra])
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "o.npy").exists()


def test_cli_subprocess_exit_code(tmp_path):
    """The real `python -m AToM.inference` entry point: one line on stderr, exit status 2."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "AToM.inference",
            "--hubert",
            str(tmp_path / "x.npy"),
            "--ref_lm3d",
            str(tmp_path / "y.npy"),
            "--out",
            str(tmp_path / "o.npy"),
            "--random_weights",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: HuBERT features file not found"), proc.stderr


def test_cli_more_bad_inputs_one_line_nothing_written(tiny_ckpt, bfm_dir, tmp_path, capsys):
    """Found by running the CLI: --guidance nan/inf and complex features exited 0 (NaN or cast
    landmarks), a seed past 64 bits, a negative model size and a --png_dir that is a file were
    tracebacks (the last after writing the .npy); an existing OUT.yaml was overwritten silently."""
    hub, ref, _ = _inputs(16, 21)
    np.save(tmp_path / "h.npy", hub)
    np.save(tmp_path / "c.npy", hub.astype(np.complex64))
    np.save(tmp_path / "r.npy", ref)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "neg.yaml").write_text("model: {latent_dim: -3}\n")
    h, c, r = (str(tmp_path / n) for n in ("h.npy", "c.npy", "r.npy"))
    out = tmp_path / "out" / "o.npy"
    base = ["--out", str(out), "--bfm_dir", str(bfm_dir), "--device", "cpu", "--ref_lm3d", r]
    ck = ["--checkpoint", str(tiny_ckpt), "--steps", "2"]
    cases = [
        (["--hubert", h, *ck, "--guidance", "nan"], "guidance weight must be a finite number"),
        (["--hubert", h, *ck, "--guidance", "inf"], "guidance weight must be a finite number"),
        (["--hubert", h, *ck, "--seed", "99999999999999999999"], "seed must be in 0..2**63-1"),
        (["--hubert", h, *ck, "--seed", "-1"], "seed must be in 0..2**63-1"),
        (["--hubert", c, *ck], "not real numbers (dtype complex64)"),
        (["--hubert", h, *ck, "--png_dir", str(tmp_path / "afile")], "is a file, not a folder"),
        (["--hubert", h, "--random_weights", "--config", str(tmp_path / "neg.yaml")], "negative dimension"),
    ]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as exc:
            cli_main(main, [*base, *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        assert needle in lines[0], lines[0]
        assert not out.exists() and not out.with_suffix(".yaml").exists()
    assert not out.parent.exists()  # a refused run does not even create the output folder
    out.parent.mkdir()
    out.with_suffix(".yaml").write_text("kept: true\n")
    with pytest.raises(SystemExit) as exc:
        cli_main(main, [*base, "--hubert", h, *ck])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err
    assert not out.exists() and out.with_suffix(".yaml").read_text() == "kept: true\n"


def test_out_of_range_inputs_are_refused_not_saved_as_nan(tiny_ckpt, bfm_dir, tmp_path, capsys):
    """Finite but huge inputs (1e30) made the network overflow: exit 0 with an all-NaN .npy."""
    hub, ref, _ = _inputs(16, 21)
    np.save(tmp_path / "h.npy", np.full_like(hub, 1e30))
    np.save(tmp_path / "r.npy", ref)
    out = tmp_path / "o.npy"
    argv = ["--hubert", str(tmp_path / "h.npy"), "--ref_lm3d", str(tmp_path / "r.npy"), "--out", str(out)]
    argv += ["--checkpoint", str(tiny_ckpt), "--bfm_dir", str(bfm_dir), "--steps", "2", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if line.strip() and "AToM windows" not in line]
    assert exc.value.code == 2 and len(lines) == 1 and "NaN/inf landmarks" in lines[0], lines
    assert not out.exists() and not out.with_suffix(".yaml").exists()
