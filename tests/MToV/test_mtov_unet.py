"""MToV tri-plane UNet: fixture equivalence, full-size manifest, config variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MANIFESTS, load_fixture

from MToV.models import DiffusionWrapper, UNetModel

FIXTURE = "mtov_unet_tiny_seed0.pt"


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_fixture(FIXTURE)


@pytest.fixture(scope="module")
def model(fx) -> DiffusionWrapper:
    net = DiffusionWrapper(UNetModel(**fx["config"]["UNetModel"])).eval()
    net.load_state_dict(fx["state_dict"], strict=True)
    return net


@pytest.fixture(scope="module")
def eps(fx, model) -> torch.Tensor:
    i = fx["inputs"]
    with torch.inference_mode():
        return model(i["x"], i["cond"], i["image_cond"], i["t"])


def test_eps_matches_fixture(fx, eps):
    ref = fx["outputs"]["eps"]
    assert eps.shape == ref.shape
    torch.testing.assert_close(eps, ref, atol=3e-5, rtol=1e-5)


def test_full_length_image_cond_gives_same_eps(fx, model, eps):
    """Only the xy-plane of image_cond is used; the rest is replaced by zeros."""
    i = fx["inputs"]
    r = model.diffusion_model.plane_sizes(i["x"].shape[-1])[0]
    full = torch.randn(i["x"].shape)
    full[:, :, : r * r] = i["image_cond"][:, :, : r * r]
    with torch.inference_mode():
        b = model(i["x"], i["cond"], full, i["t"])
    torch.testing.assert_close(eps, b, atol=3e-5, rtol=1e-5)  # same up to thread-count rounding


def test_unused_bg_modules_do_not_change_output(fx, eps):
    i = fx["inputs"]
    net = DiffusionWrapper(UNetModel(**fx["config"]["UNetModel"])).eval()
    sd = {k: v.clone() for k, v in fx["state_dict"].items()}
    for k in sd:
        if ".output_bg_" in k:
            sd[k] += 1.0
    net.load_state_dict(sd)
    with torch.inference_mode():
        torch.testing.assert_close(net(i["x"], i["cond"], i["image_cond"], i["t"]), eps, atol=3e-5, rtol=1e-5)


def test_batch_rows_are_independent(fx, model, eps):
    i = fx["inputs"]
    both = eps
    with torch.inference_mode():
        one = model(i["x"][1:], i["cond"][1:], i["image_cond"][1:], i["t"][1:])
    torch.testing.assert_close(both[1:], one, atol=3e-5, rtol=1e-5)


def _meta_net(cfg: dict) -> DiffusionWrapper:
    with torch.device("meta"):
        return DiffusionWrapper(UNetModel(**cfg))


def test_full_size_manifest():
    man = json.loads((MANIFESTS / "mtov_unet.json").read_text())
    net = _meta_net(man["constructor_config"]["UNetModel"])
    sd = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == man["param_count"] == 207_703_172
    assert len(sd) == man["state_dict_num_keys"] == 804
    assert list(sd) == list(man["state_dict"])
    for k, spec in man["state_dict"].items():
        assert list(sd[k].shape) == spec["shape"], k
        assert str(sd[k].dtype).replace("torch.", "") == spec["dtype"], k
    assert any(k.startswith("diffusion_model.output_bg_blocks.") for k in sd)
    # full-size forward shape, evaluated on the meta device (no memory, no compute)
    io = man["io_shapes_full"]
    out = net(
        torch.empty(io["x (noisy latent)"], device="meta"),
        torch.empty([1, 8, 2048], device="meta"),
        torch.empty([1, 4, 1024], device="meta"),
        torch.zeros([1], dtype=torch.long, device="meta"),
    )
    assert list(out.shape) == io["output (eps)"]


def test_longvid_variant_has_zeros_buffer():
    man = json.loads((MANIFESTS / "mtov_unet.json").read_text())
    cfg = dict(man["constructor_config"]["UNetModel"], model_channels=256, cond_model=True)
    net = _meta_net(cfg)
    sd = net.state_dict()
    assert "diffusion_model.zeros" in sd and list(sd["diffusion_model.zeros"].shape) == [1, 4, 2048]
    assert len(sd) == 805
    assert net.diffusion_model.input_blocks[0][0].weight.shape == (256, 16, 3, 3)


@pytest.mark.parametrize(
    "overrides,length_rs",
    [
        (dict(channel_mult=[1, 2], attention_resolutions=[2], num_res_blocks=2), (8, 4)),
        (dict(channel_mult=[1, 1, 2], attention_resolutions=[1], resblock_updown=False), (16, 8)),
        (dict(use_scale_shift_norm=False, cond_model=True, image_size=8, frames=8), (8, 8)),
    ],
)
def test_config_variants_run(overrides, length_rs):
    torch.manual_seed(0)
    r, s = length_rs
    cfg = dict(
        image_size=r,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=1,
        channel_mult=[1, 1, 1],
        num_heads=4,
        use_scale_shift_norm=True,
        resblock_updown=True,
        frames=s,
    )
    cfg.update(overrides)
    net = DiffusionWrapper(UNetModel(**cfg)).eval()
    length = r * r + 2 * s * r
    assert net.diffusion_model.latent_length == length
    if cfg.get("cond_model"):
        assert net.diffusion_model.zeros.shape == (1, 4, length)
    # give the zero-initialised output layers weights so the output is not trivially zero
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.1)
    x = torch.randn(2, 4, length)
    with torch.inference_mode():
        out = net(x, torch.randn(2, 8, length), torch.randn(2, 4, r * r), torch.tensor([3, 500]))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0


def test_bad_latent_length_is_rejected(model):
    with pytest.raises(ValueError, match="latent length"):
        model(
            torch.zeros(1, 4, 1000), torch.zeros(1, 8, 1000), torch.zeros(1, 4, 1000), torch.zeros(1).long()
        )


@pytest.mark.parametrize(
    "name,channels,keys", [("mtov_diffusion.yaml", 128, 804), ("mtov_diffusion_longvid.yaml", 256, 805)]
)
def test_shipped_configs_build_the_official_sizes(name, channels, keys):
    from MToV.loading import build_models, model_config

    man = json.loads((MANIFESTS / "mtov_unet.json").read_text())
    cfg = model_config(Path(__file__).resolve().parents[2] / "configs" / name)
    with torch.device("meta"):
        ae_rgb, _, unet = build_models(cfg)
    assert ae_rgb.latent_length == 2048
    assert unet.diffusion_model.model_channels == channels
    assert len(unet.state_dict()) == keys
    if channels == 128:
        assert sum(p.numel() for p in unet.parameters()) == man["param_count"]
