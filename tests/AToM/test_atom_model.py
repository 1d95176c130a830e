"""AToM MotionDecoder + GaussianDiffusion against the recorded fixture and the full-size manifest."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MANIFESTS, load_fixture

from AToM.diffusion import SCHEDULE_BUFFERS, GaussianDiffusion, ddim_times
from AToM.model import MotionDecoder

FWD_TOL = 1e-5
SAMPLER_TOL = 1e-4


# tiny models: one thread is fastest and does not fight other test processes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_fixture("atom_tiny_seed0.pt")


@pytest.fixture(scope="module")
def model(fx) -> MotionDecoder:
    m = MotionDecoder(**fx["config"]["MotionDecoder"])
    m.load_state_dict(fx["state_dict"], strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def diffusion(fx, model) -> GaussianDiffusion:
    return GaussianDiffusion(model, **fx["diffusion"]["config"]).eval()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


def test_state_dict_keys_in_official_order(fx, model):
    sd = model.state_dict()
    assert list(sd) == list(fx["state_dict"])
    for k, v in fx["state_dict"].items():
        assert sd[k].shape == v.shape and sd[k].dtype == v.dtype, k


@pytest.mark.parametrize("drop, key", [(0.0, "forward_cond"), (1.0, "forward_uncond")])
def test_forward_kept_and_dropped(fx, model, drop, key):
    i = fx["inputs"]
    with torch.no_grad():
        out = model(i["x_pos"], i["x"], i["face"], i["cond_embed"], i["times"], cond_drop_prob=drop)
    _close(out, fx["outputs"][key], FWD_TOL)


def test_forward_randomly_dropped_under_seed(fx, model):
    i, o = fx["inputs"], fx["outputs"]
    torch.manual_seed(o["forward_drop0p25_seed"])
    with torch.no_grad():
        out = model(i["x_pos"], i["x"], i["face"], i["cond_embed"], i["times"], cond_drop_prob=0.25)
    _close(out, o["forward_drop0p25_seeded"], FWD_TOL)
    # each row equals the kept or the dropped forward, per the recorded mask
    for b, keep in enumerate(o["forward_drop0p25_seeded_keep_mask"].tolist()):
        ref = o["forward_cond"] if keep else o["forward_uncond"]
        _close(out[b], ref[b], FWD_TOL)


@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("w, key", [(2.0, "guided_forward_w2"), (3.5, "guided_forward_w3p5")])
def test_guided_forward(fx, model, w, key, faithful):
    i = fx["inputs"]
    with torch.no_grad():
        out = model.guided_forward(
            i["x_pos"], i["x"], i["face"], i["cond_embed"], i["times"], w, faithful=faithful
        )
    _close(out, fx["outputs"][key], FWD_TOL)


@pytest.mark.parametrize("batched", [None, True, False])
def test_guided_decode_batched_or_two_passes(fx, model, batched):
    """The fast sampler's guided x0: one batch-2B forward or two batch-B forwards (the CPU default)
    give the recorded guided output."""
    i = fx["inputs"]
    with torch.no_grad():
        enc2 = model.encode_guidance_conditions(i["face"], i["cond_embed"])
        out = model.guided_decode(i["x"], i["times"], enc2, 2.0, batched=batched)
    _close(out, fx["outputs"]["guided_forward_w2"], FWD_TOL)


def test_schedule_buffers(fx, diffusion):
    for name in SCHEDULE_BUFFERS:
        _close(getattr(diffusion, name), fx["diffusion"]["buffers"][name], 1e-6)
    assert set(dict(diffusion.named_buffers())) >= set(SCHEDULE_BUFFERS)


def test_q_sample(fx, diffusion):
    i = fx["diffusion"]["inputs"]
    _close(diffusion.q_sample(i["x_start"], i["t"], noise=i["noise"]), fx["diffusion"]["q_sample"], 1e-6)


@pytest.mark.parametrize("case", ["drop0", "drop1", "drop0p25_seeded"])
def test_p_losses(fx, diffusion, case):
    i, rec = fx["diffusion"]["inputs"], fx["diffusion"]["p_losses"][case]
    old = diffusion.cond_drop_prob
    diffusion.cond_drop_prob = rec["cond_drop_prob"]
    try:
        if "global_seed_before_call" in rec:
            torch.manual_seed(rec["global_seed_before_call"])
        with torch.no_grad():
            total, ex = diffusion.p_losses(
                i["x_start"], i["x_pos"], i["face"], i["cond"], i["t"], noise=i["noise"]
            )
    finally:
        diffusion.cond_drop_prob = old
    assert torch.equal(ex["keep_mask"], rec["keep_mask"])
    _close(ex["model_out"], rec["model_out"], FWD_TOL)
    _close(total, rec["total"], FWD_TOL)
    _close(ex["loss"], rec["loss_weighted_7p5"], FWD_TOL)
    _close(ex["v_loss"], rec["v_loss_weighted_1p5"], FWD_TOL)


def test_p_losses_full_mask_equals_plain_mean(fx, diffusion):
    i = fx["diffusion"]["inputs"]
    mask = torch.ones(i["x_start"].shape[:2], dtype=torch.bool)
    diffusion.cond_drop_prob, old = 0.0, diffusion.cond_drop_prob
    try:
        with torch.no_grad():
            a, _ = diffusion.p_losses(
                i["x_start"], i["x_pos"], i["face"], i["cond"], i["t"], noise=i["noise"]
            )
            b, _ = diffusion.p_losses(
                i["x_start"], i["x_pos"], i["face"], i["cond"], i["t"], noise=i["noise"], mask=mask
            )
            mask[:, 4:] = False  # the masked loss ignores frames it is told to
            c, _ = diffusion.p_losses(
                i["x_start"], i["x_pos"], i["face"], i["cond"], i["t"], noise=i["noise"], mask=mask
            )
    finally:
        diffusion.cond_drop_prob = old
    _close(a, b, 1e-6)
    assert abs(a.item() - c.item()) > 1e-4


def test_ddim_times(fx):
    s = fx["diffusion"]["ddim_sample"]
    pairs = ddim_times(1000, s["sampling_timesteps"])
    assert [p[0] for p in pairs] == s["times"].tolist()
    assert pairs[-1][1] == -1


def test_ddim_first_step(fx, diffusion):
    f, i = fx["diffusion"]["ddim_first_step"], fx["diffusion"]["inputs"]
    with torch.no_grad():
        enc2 = diffusion.model.encode_guidance_conditions(i["face"], i["cond"])
        x_next, x_start, pred_noise = diffusion.ddim_step(
            f["x"], f["time"], f["time_next"], enc2, lambda r: f["noise"]
        )
    _close(x_start, f["x_start"], FWD_TOL)
    _close(pred_noise, f["pred_noise"], SAMPLER_TOL)
    _close(x_next, f["x_next"], SAMPLER_TOL)


def test_ddim_every_step(fx, diffusion):
    s, i = fx["diffusion"]["ddim_sample"], fx["diffusion"]["inputs"]
    xs, noises = s["x_per_step"], s["step_noises"]
    with torch.no_grad():
        enc2 = diffusion.model.encode_guidance_conditions(i["face"], i["cond"])
        for k, (time, time_next) in enumerate(ddim_times(1000, 50)):
            noise_fn = (lambda r, k=k: noises[k]) if time_next >= 0 else None
            x_next, x_start, _ = diffusion.ddim_step(xs[k], time, time_next, enc2, noise_fn)
            ref = xs[k + 1] if time_next >= 0 else s["x_start_last_step"]
            _close(x_next, ref, SAMPLER_TOL)


def test_ddim_sample_end_to_end_under_global_seed(fx, diffusion):
    s, i = fx["diffusion"]["ddim_sample"], fx["diffusion"]["inputs"]
    torch.manual_seed(s["global_seed_before_call"])
    x_init = torch.randn(s["shape"])
    _close(x_init, s["x_init"], 0.0)
    torch.manual_seed(s["global_seed_before_call"])
    out = diffusion.ddim_sample(s["shape"], i["face"], i["x_pos"], i["cond"])
    _close(out, s["output"], SAMPLER_TOL)
    # the global RNG was consumed exactly as the original: randn(shape) + 49 randn_like
    torch.manual_seed(s["global_seed_before_call"])
    torch.randn(s["shape"])
    for _ in range(49):
        torch.randn(s["shape"])
    after_ref = torch.rand(4)
    torch.manual_seed(s["global_seed_before_call"])
    diffusion.ddim_sample(s["shape"], i["face"], i["x_pos"], i["cond"])
    assert torch.equal(torch.rand(4), after_ref)


def test_ddim_sample_generator_matches_global_seed(fx, diffusion):
    s, i = fx["diffusion"]["ddim_sample"], fx["diffusion"]["inputs"]
    g = torch.Generator().manual_seed(s["global_seed_before_call"])
    out = diffusion.ddim_sample(s["shape"], i["face"], i["x_pos"], i["cond"], generator=g)
    _close(out, s["output"], SAMPLER_TOL)


def test_full_size_manifest():
    man = json.loads((MANIFESTS / "atom.json").read_text())
    with torch.device("meta"):
        m = MotionDecoder(**man["constructor_config"]["MotionDecoder"])
        diff = GaussianDiffusion(m, **man["constructor_config"]["GaussianDiffusion"])
    sd = m.state_dict()
    assert len(sd) == man["state_dict_num_keys"] == 344
    assert list(sd) == list(man["state_dict"])
    for k, v in man["state_dict"].items():
        assert list(sd[k].shape) == v["shape"] and str(sd[k].dtype) == f"torch.{v['dtype']}", k
    assert sum(p.numel() for p in m.parameters()) == man["param_count"] == 65_177_292
    extra = {k for k in diff.state_dict() if not k.startswith("model.")}
    assert extra == set(man["diffusion_wrapper_state_dict_extra_keys"])


@pytest.mark.slow
def test_full_size_random_model_runs_long_audio():
    """Full-size AToM (random weights) on 8 s of audio: two windows, 200 frames out (RUN_SLOW=1)."""
    import numpy as np

    from AToM.inference import generate_landmarks, load_atom

    d = load_atom(None, random_weights=True)
    assert sum(p.numel() for p in d.model.parameters()) == 65_177_292
    rng = np.random.default_rng(0)
    hub = rng.normal(size=(400, 1024)).astype(np.float32)
    kms = rng.normal(size=(68, 3)).astype(np.float32) * 0.5
    out = generate_landmarks(d, hub, kms, kms, steps=2, progress=False)
    assert out.shape == (200, 68, 3) and np.isfinite(out).all()
