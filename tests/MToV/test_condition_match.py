"""The landmark condition the samplers feed the landmark autoencoder equals what the MToV trainers
(MToV.dataset, and through it the latent cache) render for the same landmarks: dots drawn at the
model's size with its data.landmark_radius, not drawn at the output size and resized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.video import write_frame
from MToV.dataset import HDTFClipDataset

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "mtov_tiny.yaml")
OUT = 256  # the output (and reference crop) size


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _landmarks(t: int) -> np.ndarray:
    """[t, 68, 2] float32 pixel landmarks in the 256 crop, with fractions (truncation matters)."""
    rng = np.random.default_rng(7)
    return rng.uniform(10.0, OUT - 10.0, (t, 68, 2)).astype(np.float32)


def _training_condition(tmp: Path, lm: np.ndarray, resolution: int, radius: int) -> torch.Tensor:
    """x_l of the trainers' dataset for the frames carrying ``lm``: [3, T, R, R] in [-1, 1]."""
    frames = tmp / "data" / "frames" / "v0"
    kp = tmp / "data" / "keypoints" / "non-face-centric" / "posed" / "v0"
    frames.mkdir(parents=True)
    kp.mkdir(parents=True)
    for i, pts in enumerate(lm):
        write_frame(frames / f"{i:05d}.png", np.full((OUT, OUT, 3), 90, np.uint8))
        np.save(kp / f"{i:05d}.npy", pts)
    ds = HDTFClipDataset(
        tmp / "data", split="all", timesteps=len(lm), resolution=resolution, keys=("x_l",), radius=radius
    )
    return ds.clip(0, 0)["x_l"]


def _recording(models, calls: list) -> None:
    extract = models.ae_ldmk.extract

    def record(x, *a, **k):
        calls.append(x.detach().float().cpu().clone())
        return extract(x, *a, **k)

    models.ae_ldmk.extract = record


@pytest.mark.parametrize("radius", [3, 2])
def test_sample_cli_condition_equals_training(tmp_path, monkeypatch, radius):
    """MToV.sample (--size 256, tiny 32-px model): the landmark autoencoder's input == the dataset's."""
    import MToV.sample as sample

    loaded: list = []
    real = sample.load_mtov

    def load(*a, **k):
        m = real(*a, **k)
        loaded.append(m)
        _recording(m, calls)
        return m

    calls: list = []
    monkeypatch.setattr(sample, "load_mtov", load)
    clip = 8  # the tiny config's clip length
    lm = _landmarks(clip)
    np.save(tmp_path / "aligned.npy", lm)
    ref = tmp_path / "ref"
    ref.mkdir()
    write_frame(ref / "00000.png", np.full((OUT, OUT, 3), 120, np.uint8))
    np.save(tmp_path / "ref_lm.npy", lm[:1])
    argv = ["--landmarks", str(tmp_path / "aligned.npy"), "--ref_frames", str(ref)]
    argv += ["--ref_landmarks", str(tmp_path / "ref_lm.npy"), "--out", str(tmp_path / "out")]
    argv += ["--config", TINY, "--random_weights", "--precision", "fp32", "--no_progress"]
    sample.main([*argv, f"data.landmark_radius={radius}"])
    (models,) = loaded
    size = models.resolution
    assert size == 32
    train = _training_condition(tmp_path, lm, size, radius)
    assert len(calls) == 1 and calls[0].shape == (1, 3, clip, size, size)
    torch.testing.assert_close(calls[0][0], train, rtol=0, atol=1e-6)


def test_pipeline_condition_equals_training(tmp_path, monkeypatch):
    """The pipeline's MToV stage (tiny 32-px model, 256 output): every clip the landmark autoencoder
    encodes == the dataset's x_l for the aligned landmarks; the small model's condition is keyed."""
    import MToV.loading as loading
    from data.sample_data import write_reference_image, write_speech
    from pipeline.inference import main

    torch.set_num_threads(1)
    calls: list = []
    real = loading.load_mtov

    def load(*a, **k):
        m = real(*a, **k)
        _recording(m, calls)
        return m

    monkeypatch.setattr(loading, "load_mtov", load)
    photo = tmp_path / "face.png"
    write_reference_image(photo)
    speech = write_speech(tmp_path / "speech.wav", seconds=1.0)
    out = tmp_path / "res" / "talk.mp4"
    config = str(REPO / "configs" / "inference_tiny.yaml")
    argv = ["--audio", str(speech), "--ref_image", str(photo), "--out", str(out), "--config", config]
    result = main([*argv, "--random_weights", "--device", "cpu", "mtov.precision=fp32"])
    (aligned_file,) = result.work_dir.glob("align-*/aligned_lm68.npy")
    lm = np.load(aligned_file).astype(np.float32)
    assert len(lm) == result.n_frames
    clip = 8
    train = _training_condition(tmp_path, lm, 32, 3)  # [3, T, 32, 32]
    pad = (-train.shape[1]) % clip
    train = torch.cat([train, train[:, -1:].expand(-1, pad, -1, -1)], dim=1)
    expected = [train[:, i : i + clip] for i in range(0, train.shape[1], clip)]
    distinct = [c for i, c in enumerate(expected) if not any(torch.equal(c, e) for e in expected[:i])]
    got = [c for x in calls for c in x]
    assert len(got) == len(distinct)
    for g, e in zip(got, distinct, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    (parts,) = result.work_dir.glob("mtov-*/parts.json")  # a new key: entries made before are not reused
    assert json.loads(parts.read_text())["condition"] == {"size": 32, "radius": 3}
