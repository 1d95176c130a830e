"""The benchmark's set-up: every network of the chain with random weights, and the inputs (audio,
reference frames, their geometry) that :mod:`benchmarks.run` runs them on."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moditalker.constants import FPS, SAMPLE_RATE
from moditalker.fileio import REPO_ROOT

__all__ = ["HUBERT_LARGE", "Inputs", "Networks", "build_networks", "make_inputs", "randomize_zero_params"]

# HuBERT-large (facebook/hubert-large-ls960-ft) architecture, for the random full-size extractor.
HUBERT_LARGE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    conv_dim=(512,) * 7,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    conv_bias=True,
)


@dataclass
class Networks:
    """Every network of the chain, with random weights, on one device."""

    hubert: Any  # data.audio.HubertExtractor
    atom: Any  # AToM.diffusion.GaussianDiffusion
    mtov: Any  # MToV.loading.MToVModels
    tiny: bool


@dataclass
class Inputs:
    """Audio, reference frames and the per-frame geometry the alignment needs."""

    wave: np.ndarray  # float32 [n_frames * 640 + 80] at 16 kHz
    frames: np.ndarray  # uint8 [T, S, S, 3] reference frames (one per output frame)
    lm68: np.ndarray  # float32 [T, 68, 2] their 2D landmarks
    coeff: np.ndarray  # float32 [T, 257] their 3DMM coefficients
    lm3d_std: np.ndarray  # [5, 3] POS template
    ref_lm3d: np.ndarray  # [T, 68, 3] their frontal landmarks (idexp / 10 + key mean shape)
    key_mean: np.ndarray  # [68, 3]
    n_frames: int


def randomize_zero_params(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> int:
    """Give every all-zero parameter (zero-initialised output convolutions, biases) N(0, std) values so
    the network's output is not trivially zero; returns how many tensors were changed."""
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.device, p.dtype))
                changed += 1
    return changed


def build_networks(device: torch.device, tiny: bool = False, seed: int = 0) -> Networks:
    """Full-size AToM, MToV and HuBERT-large with random weights (``tiny``: the tiny test configs)."""
    from AToM.inference import load_atom
    from data.audio import HubertExtractor
    from MToV.loading import load_mtov

    atom_cfg = str(REPO_ROOT / "configs" / "atom_tiny.yaml") if tiny else None
    mtov_cfg = str(REPO_ROOT / "configs" / "mtov_tiny.yaml") if tiny else None
    atom = load_atom(None, atom_cfg, device=device, random_weights=True)
    mtov = load_mtov(None, None, None, config=mtov_cfg, device=device, random_weights=True)
    randomize_zero_params(mtov.unet, seed + 1)
    hidden = int(atom.model.cond_feature_dim)
    if tiny:
        hubert = HubertExtractor.random(hidden_size=hidden, seed=seed, device=device)
    else:
        from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = HubertModel(HubertConfig(**HUBERT_LARGE))
        hubert = HubertExtractor(
            "random-hubert-large",
            device=device,
            _model=model,
            _feature_extractor=Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=SAMPLE_RATE),
        )
    return Networks(hubert, atom, mtov, tiny)


def make_inputs(seconds: float, size: int = 256, seed: int = 0, still: bool = False) -> Inputs:
    """``seconds`` of the bundled speech clip (looped if needed) and the moving astronaut reference,
    with template landmarks and smooth synthetic head poses (the geometry FAN and Deep3DFaceRecon
    would give; they are not part of the benchmark). ``still``: the first frame, its landmarks and
    its pose held for every frame, as ``--ref_image`` gives."""
    import soundfile as sf

    from data.audio import resample
    from data.face3d import Face3DHelper, write_synthetic_bfm
    from data.landmarks import template_face_detector
    from data.recon3d import load_lm3d_std
    from data.sample_data import SAMPLE_SPEECH, reference_frames

    n_frames = max(1, int(round(seconds * FPS)))
    speech, sr = sf.read(SAMPLE_SPEECH, dtype="float32", always_2d=False)
    speech = resample(np.asarray(speech if speech.ndim == 1 else speech[:, 0]), sr, SAMPLE_RATE)
    need = n_frames * (SAMPLE_RATE // FPS) + 80
    wave = np.resize(speech, need).astype(np.float32)  # loops a short clip
    frames = reference_frames(n_frames, size)
    rng = np.random.default_rng(seed)
    k = np.arange(n_frames)[:, None]
    lm68 = template_face_detector(frames) + np.sin(2 * math.pi * k / max(n_frames, 1))[..., None] * 2.0
    coeff = np.zeros((n_frames, 257), np.float32)
    coeff[:, :80] = rng.normal(0, 0.3, 80)
    coeff[:, 80:144] = rng.normal(0, 0.3, (n_frames, 64)) * 0.3
    phase = 2 * math.pi * np.arange(n_frames) / max(n_frames, 1)
    coeff[:, 224] = 0.05 * np.sin(phase)
    coeff[:, 225] = 0.08 * np.sin(2 * phase)
    coeff[:, 254:257] = np.stack([0.02 * np.sin(phase), 0.01 * np.cos(phase), np.zeros(n_frames)], 1)
    if still:
        frames[:], lm68[:], coeff[:] = frames[0], lm68[0], coeff[0]
    with tempfile.TemporaryDirectory() as tmp:
        bfm = write_synthetic_bfm(Path(tmp), seed=seed)
        helper = Face3DHelper(bfm)
        lm3d_std = np.asarray(load_lm3d_std(bfm), np.float32)
        parts = helper.split_coeff(coeff)
        idexp = helper.reconstruct_idexp_lm3d(parts["identity"], parts["expression"]).cpu().numpy()
        key_mean = helper.key_mean_shape.cpu().numpy().astype(np.float32)
    return Inputs(
        wave=wave,
        frames=frames,
        lm68=lm68.astype(np.float32),
        coeff=coeff,
        lm3d_std=lm3d_std,
        ref_lm3d=(idexp / 10.0 + key_mean).astype(np.float32),
        key_mean=key_mean,
        n_frames=n_frames,
    )
