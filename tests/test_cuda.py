"""GPU paths, run by ``scripts/test.sh`` on a machine with CUDA (skipped elsewhere).

What they pin down: AToM on CUDA equals AToM on the CPU (its noise comes from a CPU generator); the
MToV fast path on CUDA is batch-independent in fp32, channels-last changes nothing, bf16 autocast stays
close to fp32; the whole pipeline writes its mp4 with ``--device cuda``. ``RUN_SLOW=1`` adds
``torch.compile`` of the UNet.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_atom_on_cuda_equals_cpu():
    from AToM.inference import generate_landmarks, load_atom

    results = []
    for device in ("cpu", "cuda"):
        diffusion = load_atom(
            None, config=REPO / "configs" / "atom_tiny.yaml", random_weights=True, device=device
        )
        dim = diffusion.model.cond_projection.in_features
        hubert = np.random.default_rng(1).normal(size=(160, dim)).astype(np.float32)
        ref = np.random.default_rng(2).normal(size=(68, 3)).astype(np.float32)
        key_mean = np.zeros((68, 3), np.float32)
        results.append(generate_landmarks(diffusion, hubert, ref, key_mean, steps=10, seed=3, progress=False))
    assert results[0].shape == results[1].shape == (80, 68, 3)
    assert np.abs(results[0] - results[1]).max() < 1e-3


def _mtov_inputs(models, t: int):
    size = models.resolution
    rng = np.random.default_rng(0)
    lv = np.zeros((t, 3, size, size), np.uint8)
    lv[:, :, rng.integers(0, size, 20), rng.integers(0, size, 20)] = 255
    for i in range(t):
        lv[i, :, 0, i % size] = 255
    masked = rng.integers(0, 256, (t, 3, size, size), dtype=np.uint8)
    masked[:, :, size // 2 :] = 0
    ident = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
    return lv, masked, ident


@pytest.fixture(scope="module")
def mtov_cuda():
    from MToV.loading import load_mtov

    models = load_mtov(
        None, None, None, config=REPO / "configs" / "mtov_tiny.yaml", random_weights=True, device="cuda"
    )
    g = torch.Generator().manual_seed(5)
    for p in models.unet.parameters():  # zero-initialised output layers get weights: eps != 0
        if p.abs().sum() == 0:
            p.data.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p.device))
    return models


def test_mtov_fast_path_on_cuda(mtov_cuda):
    from MToV.generate import generate_video
    from MToV.loading import prepare_for_device

    models = mtov_cuda
    t = 2 * models.clip_frames + 3
    lv, masked, ident = _mtov_inputs(models, t)
    kw = dict(sampling_timesteps=8, progress=False, seed=2)
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 convolutions for the comparisons
    try:
        one = generate_video(models, lv, masked, ident, batch_size=1, precision="fp32", **kw)
        many = generate_video(models, lv, masked, ident, batch_size=3, precision="fp32", **kw)
        assert one.shape == (t, 3, models.resolution, models.resolution) and one.std() > 1
        assert np.abs(one.astype(int) - many).max() <= 1
        prepare_for_device(models)  # channels-last UNet
        channels_last = generate_video(models, lv, masked, ident, batch_size=3, precision="fp32", **kw)
        assert np.abs(channels_last.astype(int) - many).max() <= 1
    finally:
        torch.backends.cudnn.allow_tf32 = True
    bf16 = generate_video(models, lv, masked, ident, batch_size=3, precision="auto", **kw)
    assert _psnr(bf16, many) >= 35


@pytest.mark.slow
def test_mtov_compiled_unet_on_cuda(mtov_cuda):
    from MToV.generate import generate_video
    from MToV.loading import prepare_for_device

    models = mtov_cuda
    lv, masked, ident = _mtov_inputs(models, models.clip_frames)
    kw = dict(sampling_timesteps=8, progress=False, seed=2, precision="fp32", batch_size=1)
    eager = generate_video(models, lv, masked, ident, **kw)
    models._prepared = False
    prepare_for_device(models, compile=True)
    compiled = generate_video(models, lv, masked, ident, **kw)
    assert _psnr(compiled, eager) >= 40


def test_pipeline_end_to_end_on_cuda(tmp_path):
    from data.sample_data import write_reference_video, write_speech
    from data.video import probe
    from pipeline.inference import main

    speech = write_speech(tmp_path / "speech.wav", seconds=2.0)
    video = write_reference_video(tmp_path / "ref.mp4", seconds=1.0)
    out = tmp_path / "out.mp4"
    argv = ["--audio", str(speech), "--ref_video", str(video), "--out", str(out), "--device", "cuda"]
    result = main(argv + ["--random_weights", "--config", str(REPO / "configs" / "inference_tiny.yaml")])
    info = probe(out)
    assert info["video"]["frames"] == result.n_frames == 50 and info["audio"] is not None
