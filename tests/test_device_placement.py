"""Device placement without a GPU: the networks' forwards run on the ``meta`` device.

A forward that builds a tensor on the CPU (``torch.arange(n)`` without ``device=``, a CPU buffer not
registered on the module, ...) and mixes it with the module's tensors fails on ``meta`` exactly as it
would on CUDA, so these tests catch GPU placement bugs on a CPU-only machine. (Sampling loops with
their random generators and host-side decisions are covered by the CUDA tests when a GPU is present.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from AToM.inference import load_atom
from AToM.model import EncodedConditions
from MToV.diffusion import DDPM
from MToV.loading import load_mtov

REPO = Path(__file__).resolve().parents[1]
META = torch.device("meta")


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device=META)


@pytest.fixture(scope="module")
def mtov():
    return load_mtov(None, None, None, config=REPO / "configs" / "mtov_tiny.yaml", random_weights=True)


def test_atom_guided_decode_on_meta():
    diffusion = load_atom(None, config=REPO / "configs" / "atom_tiny.yaml", random_weights=True)
    model = diffusion.model
    horizon, dim = model.seq_len, model.cond_projection.in_features
    face, cond = torch.randn(1, horizon, 204), torch.randn(1, 2 * horizon, dim)
    # conditions are encoded once per window (their keep-mask test reads a value back to the host)
    enc2 = model.encode_guidance_conditions(face, cond)
    model.to(META)
    enc2 = EncodedConditions(*(t.to(META) for t in enc2._fields()))
    x, t = _meta(1, horizon, 204), torch.full((1,), 5, device=META)
    for batched in (True, False):
        out = model.guided_decode(x, t, enc2, 2.0, batched=batched)
        assert out.device == META and out.shape == (1, horizon, 204)


@pytest.mark.parametrize("name", ["ae_rgb", "ae_ldmk"])
def test_autoencoder_paths_on_meta(mtov, name):
    ae = getattr(mtov, name).to(META)
    latent = ae.extract(_meta(2, 3, ae.timesteps, ae.res, ae.res))
    assert latent.device == META and latent.shape == (2, ae.embed_dim, ae.latent_length)
    frames = ae.decode_from_sample(latent)
    assert frames.shape == (2 * ae.timesteps, 3, ae.res, ae.res)
    recon, _ = ae(_meta(1, 3, ae.splits * ae.s, ae.res, ae.res))
    assert recon.device == META


def test_unet_and_training_loss_on_meta(mtov):
    e, length, r = mtov.ae_rgb.embed_dim, mtov.ae_rgb.latent_length, mtov.ae_rgb.r
    unet = mtov.unet.to(META)
    eps = unet(
        _meta(2, e, length), _meta(2, 2 * e, length), _meta(2, e, r * r), torch.full((2,), 3, device=META)
    )
    assert eps.device == META and eps.shape == (2, e, length)
    diff = {k: mtov.config.diffusion[k] for k in ("linear_start", "linear_end", "timesteps")}
    ddpm = DDPM(unet, channels=e, image_size=r, frames=mtov.clip_frames, **diff).to(META)
    loss, _ = ddpm(_meta(2, e, length), _meta(2, 2 * e, length), _meta(2, e, r * r))
    assert loss.device == META and loss.dim() == 0
