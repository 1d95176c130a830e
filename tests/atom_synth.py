"""Synthetic AToM training clips whose mouth follows the audio loudness (shared by the AToM and the
multi-process tests): ``write_npz_clips(folder, n, seed)`` writes ``clipNNN.npz`` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LIP = list(range(0, 17)) + list(range(48, 68))
DIM = 16  # cond_feature_dim of configs/atom_tiny.yaml
HORIZON = 24  # seq_len of configs/atom_tiny.yaml


def make_clip(rng: np.random.Generator, n_frames: int) -> dict[str, np.ndarray]:
    """One clip: ``hubert [2T, 16]`` with a loudness envelope, ``idexp_lm3d [T, 68, 3]`` following it."""
    r0 = np.random.default_rng(0)  # fixed across clips: the audio -> mouth mapping
    pattern = np.zeros((68, 3), np.float32)
    pattern[LIP, 1] = r0.uniform(0.5, 1.0, len(LIP))
    direction = r0.normal(size=DIM).astype(np.float32)
    direction *= 4 / np.linalg.norm(direction)
    s = np.arange(2 * n_frames)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * s / rng.uniform(40, 100) + rng.uniform(0, 2 * np.pi))
    hubert = env[:, None] * direction[None] + 0.1 * rng.normal(size=(2 * n_frames, DIM))
    identity = rng.normal(size=(68, 3)) * 0.03
    mouth = env.reshape(n_frames, 2).mean(1)
    lm = identity[None] + 0.6 * mouth[:, None, None] * pattern[None]
    return {"hubert": hubert.astype(np.float32), "idexp_lm3d": lm.astype(np.float32)}


def write_npz_clips(folder: Path, n: int, seed: int, frames=(30, 90)) -> list[dict]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    clips = [make_clip(rng, int(rng.integers(*frames))) for _ in range(n)]
    for i, c in enumerate(clips):
        np.savez(folder / f"clip{i:03d}.npz", **c)
    return clips
