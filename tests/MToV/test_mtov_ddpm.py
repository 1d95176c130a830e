"""MToV DDPM: schedule buffers, q_sample, p_losses, DDIM (step by step) and noised-start DDIM."""

from __future__ import annotations

import pytest
import torch
from conftest import load_fixture

from MToV.diffusion import DDPM
from MToV.models import DiffusionWrapper, UNetModel


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_fixture("mtov_unet_tiny_seed0.pt")


@pytest.fixture(scope="module")
def model(fx) -> DiffusionWrapper:
    net = DiffusionWrapper(UNetModel(**fx["config"]["UNetModel"])).eval()
    net.load_state_dict(fx["state_dict"], strict=True)
    return net


def _sampler(model, fx, **kw) -> DDPM:
    ic = fx["config"]["UNetModel"]["image_size"]
    return DDPM(model, channels=4, image_size=ic, sampling_timesteps=100, w=0.0, **kw).eval()


def test_buffers_and_logvar(fx, model):
    d = fx["diffusion"]
    ddpm = DDPM(model, **d["train_constructor_kwargs"])
    for name, ref in d["buffers"].items():
        torch.testing.assert_close(getattr(ddpm, name), ref, rtol=1e-6, atol=0, msg=name)
    assert "lvlb_weights" not in ddpm.state_dict()  # non-persistent, as the original
    assert "betas" in ddpm.state_dict()
    torch.testing.assert_close(ddpm.logvar, d["logvar_attribute"])
    assert ddpm.loss_type == "l2"


def test_q_sample_and_p_losses(fx, model):
    d = fx["diffusion"]
    i = d["inputs"]
    ddpm = DDPM(model, **d["train_constructor_kwargs"]).eval()
    torch.testing.assert_close(ddpm.q_sample(i["x_start"], i["t"], noise=i["noise"]), d["q_sample"])
    with torch.inference_mode():
        loss, log = ddpm.p_losses(i["x_start"], i["cond"], i["image_cond"], i["t"], noise=i["noise"])
        out = model(d["q_sample"], i["cond"], i["image_cond"], i["t"])
    ref = d["p_losses"]
    torch.testing.assert_close(out, ref["model_out"], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref["loss"], atol=1e-5, rtol=1e-5)
    assert set(log) == set(ref["loss_dict_eval_mode"])
    for k, v in ref["loss_dict_eval_mode"].items():
        torch.testing.assert_close(log[k], v, atol=1e-5, rtol=1e-5)
    # training mode uses the train/ prefix; the l1 option is the mean absolute error
    ddpm.train()
    _, log_train = ddpm.p_losses(i["x_start"], i["cond"], i["image_cond"], i["t"], noise=i["noise"])
    assert set(log_train) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    ddpm.eval()
    l1 = DDPM(model, loss_type="l1", **d["train_constructor_kwargs"]).eval()
    with torch.inference_mode():
        loss1, _ = l1.p_losses(i["x_start"], i["cond"], i["image_cond"], i["t"], noise=i["noise"])
    torch.testing.assert_close(loss1, (ref["model_out"] - i["noise"]).abs().mean(), atol=1e-5, rtol=1e-5)


def test_ddim_eta0_step_by_step(fx, model):
    """The eta-0 sampler is chaotic over 100 steps, so it is checked step by step (reference README)."""
    d = fx["diffusion"]
    e = d["ddim_eta0"]
    i = d["inputs"]
    ddpm = _sampler(model, fx, ddim_sampling_eta=0.0)
    assert [p[0] for p in ddpm.ddim_times()] == e["times"].tolist()
    assert ddpm.ddim_times()[-1][1] == -1
    steps = []
    torch.manual_seed(e["global_seed_before_call"])
    # run only the first two steps through the real sampler loop
    pairs = ddpm.ddim_times()[:2]
    x_init = torch.randn(2, 4, i["cond"].shape[-1])
    torch.testing.assert_close(x_init, e["x_init"], atol=0, rtol=0)
    with torch.inference_mode():
        x2 = ddpm._ddim_loop(
            x_init, i["cond"], i["image_cond"], pairs, None, False, lambda *a: steps.append(a)
        )
    fs = e["first_step"]
    assert (steps[0][0], steps[0][1]) == (fs["time"], fs["time_next"])
    torch.testing.assert_close(steps[0][3], fs["pred_noise"], atol=3e-5, rtol=1e-5)
    # x_start from the recorded pred_noise (at t=999 the x0 formula amplifies eps errors ~40x)
    t = torch.full((2,), fs["time"], dtype=torch.long)
    x0 = ddpm.predict_start_from_noise(fs["x"], t, fs["pred_noise"]).clamp(-1, 1)
    torch.testing.assert_close(x0, fs["x_start"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps[1][2], fs["x_next"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x2, e["second_step_x_next"], atol=1e-4, rtol=1e-4)
    # last step: time 9 -> -1 returns the clamped x0
    ls = e["last_step"]
    with torch.inference_mode():
        out = ddpm._ddim_loop(ls["x"], i["cond"], i["image_cond"], [(ls["time"], -1)], None, False)
        pn, _ = ddpm.model_predictions(ls["x"], i["cond"], i["image_cond"], torch.full((2,), ls["time"]))
    torch.testing.assert_close(pn, ls["pred_noise"], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(out, ls["x_start"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ls["x_start"], e["output"])


def test_noised_start_fix_noise_end_to_end(fx, model):
    d = fx["diffusion"]
    n = d["ddim_noised_start_eta1_fixnoise"]
    i = d["inputs"]
    ddpm = _sampler(model, fx)
    steps = []
    torch.manual_seed(123)  # fix_noise must reseed by itself
    with torch.inference_mode():
        out = ddpm.ddim_sample_noised_start(
            i["cond"], i["image_cond"], n["noised_start"], 0.25, True, callback=lambda *a: steps.append(a)
        )
    assert [s[0] for s in steps] == n["times"].tolist()
    torch.testing.assert_close(steps[0][2], n["x_noisy_start"], atol=1e-6, rtol=1e-6)
    fs = n["first_step"]
    torch.testing.assert_close(steps[0][3], fs["pred_noise"], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(steps[0][4], fs["x_start"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[1][2], fs["x_next"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, n["output"], atol=1e-4, rtol=1e-4)


def test_per_sample_generators_make_noise_batch_independent(fx, model):
    i = fx["diffusion"]["inputs"]
    ddpm = _sampler(model, fx)
    ddpm.sampling_timesteps = 8  # 2 steps below t=250: (249, 124), (124, -1)
    assert [p for p in ddpm.ddim_times() if p[0] < 250] == [(249, 124), (124, -1)]
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    start = i["x_start"].clamp(-1, 1)
    with torch.inference_mode():
        both = ddpm.sample(2, i["cond"], i["image_cond"], noised_start=start, generator=gens([7, 8]))
        second = ddpm.sample(
            1, i["cond"][1:], i["image_cond"][1:], noised_start=start[1:], generator=gens([8])
        )
        other = ddpm.sample(2, i["cond"], i["image_cond"], noised_start=start, generator=gens([7, 9]))
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[0], other[0], atol=1e-5, rtol=1e-5)
    assert (both[1] - other[1]).abs().max() > 1e-3
