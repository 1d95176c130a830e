"""MToV ViTAutoencoder: every recorded fixture output, full-size manifests, and config variants."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import MANIFESTS, load_fixture

from MToV.models import ViTAutoencoder
from MToV.models.autoencoder import OFFICIAL_CONFIG, patch_size_for

AE_FIXTURES = ["mtov_ae_rgb_tiny_seed0.pt", "mtov_ae_ldmk_tiny_seed0.pt"]
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the shared 2-core box oversubscribes badly with OpenMP spinning."""
    torch.set_num_threads(1)
    yield


def _build(fx: dict) -> ViTAutoencoder:
    model = ViTAutoencoder(fx["config"]["embed_dim"], fx["config"]["ddconfig"]).eval()
    model.load_state_dict(fx["state_dict"], strict=True)
    return model


@pytest.fixture(scope="module", params=AE_FIXTURES)
def ae_fixture(request):
    fx = load_fixture(request.param)
    return fx, _build(fx)


def test_state_dict_keys_in_official_order(ae_fixture):
    fx, model = ae_fixture
    assert list(model.state_dict()) == list(fx["state_dict"])


def test_buffers_match_fresh_construction(ae_fixture):
    """Rotary tables and ``coords`` are computed at construction exactly as the official ones."""
    fx, _ = ae_fixture
    fresh = ViTAutoencoder(fx["config"]["embed_dim"], fx["config"]["ddconfig"])
    for name, buf in fresh.named_buffers():
        torch.testing.assert_close(buf, fx["state_dict"][name], rtol=0, atol=1e-6)


def test_fixture_outputs(ae_fixture):
    fx, model = ae_fixture
    x = fx["inputs"]["x"]
    x_clip = fx["inputs"].get("x_encode", x)
    out = fx["outputs"]
    with torch.inference_mode():
        results = {
            "encode": model.encode(x_clip),
            "extract": model.extract(x_clip),
            "decode": model.decode(out["encode"]),
            "debug_encoder_tokens": model.encoder(x_clip.transpose(1, 2)),
            "debug_decoder_tokens": model.decoder(out["encode"]),
        }
        dfs = model.decode_from_sample(model.extract(x_clip))
        fwd = model(x)[0]
    for key, value in results.items():
        assert value.shape == out[key].shape, key
        torch.testing.assert_close(value, out[key], rtol=0, atol=ATOL, msg=key)
    torch.testing.assert_close(dfs, out["decode"], rtol=0, atol=ATOL)
    torch.testing.assert_close(fwd, out.get("forward_dec", out["decode"]), rtol=0, atol=ATOL)
    assert model(x)[1] == 0.0


def test_extract_layout_matches_encode(ae_fixture):
    """extract = [xy | yt | xt] flattened; re-expanding it reproduces encode's dense latent."""
    fx, model = ae_fixture
    x = fx["inputs"].get("x_encode", fx["inputs"]["x"])
    with torch.inference_mode():
        latent = model.extract(x)
        dense = model._dense(*model.split_latent(latent))
    r, s = model.r, model.s
    assert latent.shape == (x.shape[0], fx["config"]["embed_dim"], r * r + 2 * s * r)
    assert latent.abs().max() <= 1.0  # tanh-bounded
    torch.testing.assert_close(dense, fx["outputs"]["encode"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["mtov_ae_rgb", "mtov_ae_ldmk"])
def test_full_size_manifest(name):
    manifest = json.loads((MANIFESTS / f"{name}.json").read_text())
    cfg = manifest["constructor_config"]
    assert cfg == OFFICIAL_CONFIG  # the defaults of sampling and training are the official sizes
    model = ViTAutoencoder(cfg["embed_dim"], cfg["ddconfig"])
    sd = model.state_dict()
    assert list(sd) == list(manifest["state_dict"])
    assert len(sd) == manifest["state_dict_num_keys"] == 415
    for key, meta in manifest["state_dict"].items():
        assert list(sd[key].shape) == meta["shape"], key
        assert str(sd[key].dtype).removeprefix("torch.") == meta["dtype"], key
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"] == 62_064_399
    persistent = {k for k, _ in model.named_buffers()}
    assert persistent == set(manifest["buffers"])
    assert (
        model.latent_length
        == manifest["latent_shapes_full_input"][
            "extract(x) -> flattened triplane latent [b, embed_dim, r*r + s*r + s*r]"
        ][-1]
    )


def _tiny(resolution=16, timesteps=8, splits=1, channels=8, embed_dim=4) -> ViTAutoencoder:
    torch.manual_seed(0)
    cfg = {"channels": channels, "resolution": resolution, "timesteps": timesteps, "splits": splits}
    return ViTAutoencoder(embed_dim, cfg).eval()


@pytest.mark.parametrize(
    "resolution,timesteps,splits,channels,embed_dim",
    [(16, 8, 1, 8, 4), (24, 6, 1, 16, 3), (16, 8, 2, 8, 4), (16, 12, 3, 8, 2)],
)
def test_config_variants(resolution, timesteps, splits, channels, embed_dim):
    model = _tiny(resolution, timesteps, splits, channels, embed_dim)
    p = patch_size_for(resolution)
    s, r = timesteps // splits, resolution // p
    assert (model.s, model.r) == (s, r)
    assert model.xy_pos_embedding.shape == (1, s + 1, channels)
    assert model.xt_pos_embedding.shape == (1, r + 1, channels)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, timesteps, resolution, resolution, generator=g) * 2 - 1
    clip = x[:, :, :s]
    with torch.inference_mode():
        latent = model.extract(clip)
        assert latent.shape == (2, embed_dim, r * r + 2 * s * r)
        dense = model.encode(clip)
        assert dense.shape == (2, channels, s, r, r)
        rec = model.decode(dense)
        assert rec.shape == (2 * s, 3, resolution, resolution)
        torch.testing.assert_close(model.decode_from_sample(latent), rec, rtol=0, atol=1e-5)
        fwd, zero = model(x)
    assert zero == 0.0
    assert fwd.shape == (2 * timesteps, 3, resolution, resolution)
    # forward = each `s`-frame clip encoded/decoded on its own, clips stacked per batch element
    with torch.inference_mode():
        per_clip = [model.decode(model.encode(x[b : b + 1, :, k * s : (k + 1) * s])) for b in range(2)
                    for k in range(splits)]  # fmt: skip
    torch.testing.assert_close(fwd, torch.cat(per_clip), rtol=0, atol=1e-5)


def test_128px_uses_patch_4():
    """The official rule: 128 px uses patch 4, so the latent grid is 32 x 32."""
    model = _tiny(resolution=128, timesteps=1)
    assert (model.patch_size, model.r, model.latent_length) == (4, 32, 32 * 32 + 2 * 32)
    with torch.inference_mode():
        latent = model.extract(torch.rand(1, 3, 1, 128, 128) * 2 - 1)
        assert latent.shape == (1, 4, 32 * 32 + 2 * 32)
        assert model.decode_from_sample(latent).shape == (1, 3, 128, 128)


def test_patch_rule_and_bad_shapes():
    assert patch_size_for(256) == 8 and patch_size_for(128) == 4 and patch_size_for(64) == 8
    model = _tiny()
    with pytest.raises(ValueError, match="expected a clip"):
        model.extract(torch.zeros(1, 3, 7, 16, 16))
    with pytest.raises(ValueError, match="expected a latent"):
        model.decode_from_sample(torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="multiple of splits"):
        ViTAutoencoder(4, {"channels": 8, "resolution": 16, "timesteps": 8, "splits": 3})


def test_gradients_reach_every_parameter():
    """Training path: every parameter except the unused buffer-like ones gets a gradient."""
    model = _tiny().train()
    x = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    rec, _ = model(x)
    rec.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.slow
def test_full_size_latent_shapes():
    """Full-size forward on one clip (slow on CPU): the manifest's latent shapes."""
    manifest = json.loads((MANIFESTS / "mtov_ae_rgb.json").read_text())
    cfg = manifest["constructor_config"]
    model = ViTAutoencoder(cfg["embed_dim"], cfg["ddconfig"]).eval()
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.rand(1, 3, 16, 256, 256) * 2 - 1
    with torch.inference_mode():
        latent = model.extract(x)
        assert latent.shape == (1, 4, 2048)
        rec = model.decode_from_sample(latent)
    assert rec.shape == (16, 3, 256, 256)


@pytest.mark.parametrize("kind", ["frame", "image"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_table_paths_give_the_plain_formula_bit_for_bit(kind, dtype):
    from MToV.models.timesformer import AxialRotaryEmbedding, FrameRotaryEmbedding, RotaryTable, apply_rotary

    sin, cos = FrameRotaryEmbedding(16)(5) if kind == "frame" else AxialRotaryEmbedding(16)(3, 4)
    # the axial table's pairs share one angle (what `paired=True` promises); the frame table's do not
    shared = torch.equal(sin[..., ::2], sin[..., 1::2]) and torch.equal(cos[..., ::2], cos[..., 1::2])
    assert shared == (kind == "image")
    table = RotaryTable(sin, cos, paired=shared)
    # q as the attention gets it: a permuted view of the qkv projection, channels last
    qkv = torch.randn(2, sin.shape[0], 3, 4, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = qkv.permute(2, 0, 3, 1, 4)[0]
    expected = apply_rotary(q, sin.to(dtype), cos.to(dtype))
    out = table.apply(q)
    assert table._complex_ok(q) == (kind == "image" and dtype == torch.float32)  # the path under test
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, expected)  # complex multiply / in-place signed form: the same numbers
    # a table narrower than the head rotates the first channels and passes the rest through
    narrow = RotaryTable(sin[:, :8], cos[:, :8], paired=shared)
    assert torch.equal(narrow.apply(q), apply_rotary(q, sin[:, :8].to(dtype), cos[:, :8].to(dtype)))
