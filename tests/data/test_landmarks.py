"""FAN landmark detection: injected detectors, gap filling, heatmap decoding, weight loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.landmarks import FAN_FILE, S3FD_FILE, FaceLandmarkDetector, fill_missing, heatmaps_to_points
from moditalker.errors import UserError


def _lm(t: int) -> np.ndarray:
    base = np.stack(np.meshgrid(np.arange(17), np.arange(4)), -1).reshape(-1, 2)[:68].astype(np.float32)
    return base + np.float32(t)


def test_fill_missing_interpolates_and_counts():
    lms = np.stack([_lm(t) for t in range(8)])
    holes = lms.copy()
    holes[[0, 3, 4, 7]] = np.nan
    filled, n = fill_missing(holes, max_gap=2)
    assert n == 4
    np.testing.assert_allclose(filled[3:5], lms[3:5], atol=1e-5)  # linear between frames 2 and 5
    np.testing.assert_allclose(filled[0], lms[1])  # ends copy the nearest frame
    np.testing.assert_allclose(filled[7], lms[6])
    assert fill_missing(lms)[1] == 0
    with pytest.raises(UserError, match="frames 3..4"):
        fill_missing(holes, max_gap=1)
    with pytest.raises(UserError, match="no face found"):
        fill_missing(np.full((3, 68, 2), np.nan), source="clip.mp4")


def test_injected_detector_batches_and_gaps():
    frames = np.zeros((7, 32, 32, 3), np.uint8)
    calls = []

    def detector(batch):
        start = sum(calls)
        calls.append(len(batch))
        return [None if start + i in (2, 6) else _lm(start + i) for i in range(len(batch))]

    det = FaceLandmarkDetector(detector=detector, batch_size=3)
    lm, n = det.detect(frames)
    assert calls == [3, 3, 1] and n == 2
    assert lm.shape == (7, 68, 2) and lm.dtype == np.float32
    np.testing.assert_allclose(lm[2], _lm(2), atol=1e-5)
    np.testing.assert_allclose(lm[6], _lm(5))
    # an array with NaN rows works the same; a video without any face fails clearly
    arr = FaceLandmarkDetector(detector=lambda b: np.full((len(b), 68, 2), np.nan))
    with pytest.raises(UserError, match="no face found"):
        arr.detect(frames, source="ref.mp4")
    with pytest.raises(UserError, match="returned 1 results"):
        FaceLandmarkDetector(detector=lambda b: [None]).detect(frames)
    with pytest.raises(UserError, match="uint8"):
        det.detect(frames.astype(np.float32))


def test_heatmap_decoding():
    heat = np.zeros((1, 68, 64, 64), np.float32)
    heat[0, :, 10, 20] = 1.0
    heat[0, :, 10, 21] = 0.5  # right neighbour larger: +0.25 in x; y neighbours equal: no shift
    heat[0, 1] = 0
    heat[0, 1, 0, 7] = 1.0  # border peak: no sub-pixel step
    pts = heatmaps_to_points(heat, np.array([[100.0, 80.0]]), np.array([1.0]))
    # heatmap (21 + 0.25 - 0.5, 11 - 0.5) -> x * 200 / 64 + c - 100, truncated
    assert pts[0, 0].tolist() == [np.trunc(20.75 * 200 / 64), np.trunc(10.5 * 200 / 64 - 20)]
    assert pts[0, 1].tolist() == [np.trunc(7.5 * 200 / 64), np.trunc(0.5 * 200 / 64 - 20)]


def test_weights_missing_and_random_networks(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="moditalker.assets check"):
        FaceLandmarkDetector(weights_dir=tmp_path / "none")
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    torch.manual_seed(0)
    torch.save({k: v.half() for k, v in FAN(4).state_dict().items()}, tmp_path / FAN_FILE)
    torch.save({k: v.half() for k, v in s3fd().state_dict().items()}, tmp_path / S3FD_FILE)
    det = FaceLandmarkDetector(weights_dir=tmp_path, batch_size=2)
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    boxes = det._detect_boxes(frames)
    assert len(boxes) == 2 and all(b is None or b.shape == (5,) for b in boxes)
    monkeypatch.setattr(det, "_detect_boxes", lambda b: [np.array([8.0, 8.0, 56.0, 56.0, 0.9]), None])
    lm, n = det.detect(frames)  # one FAN pass on one crop (FAN-4 is heavy on CPU)
    assert n == 1 and np.isfinite(lm).all() and np.array_equal(lm[1], lm[0])
    assert np.array_equal(lm[0], np.trunc(lm[0]))  # whole pixels, as face_alignment returns them
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / FAN_FILE).write_bytes(b"junk")
    (tmp_path / "bad" / S3FD_FILE).write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read"):
        FaceLandmarkDetector(weights_dir=tmp_path / "bad")


@pytest.mark.slow
def test_heatmap_decoding_matches_face_alignment():
    from face_alignment.utils import get_preds_fromhm

    rng = np.random.default_rng(0)
    heat = rng.random((3, 68, 64, 64)).astype(np.float32)
    centers, scales = rng.uniform(50, 200, (3, 2)), rng.uniform(0.5, 2, 3)
    mine = heatmaps_to_points(heat, centers, scales)
    for i in range(3):
        _, ref, _ = get_preds_fromhm(heat[i : i + 1], centers[i], scales[i])
        np.testing.assert_array_equal(mine[i], ref[0])


def test_template_face_detector():
    from data.landmarks import template_face_detector

    lm = template_face_detector(np.zeros((2, 100, 80, 3), np.uint8))
    assert lm.shape == (2, 68, 2) and lm.dtype == np.float32
    assert np.array_equal(lm[0], lm[1])
    assert (
        (lm[..., 0] > 0).all()
        and (lm[..., 0] < 80).all()
        and (lm[..., 1] > 0).all()
        and (lm[..., 1] < 100).all()
    )
    assert lm[0, 8, 1] > lm[0, 30, 1] > lm[0, 19, 1]  # chin below nose below brows (y down)
    det = FaceLandmarkDetector(detector=template_face_detector)
    assert det.detect(np.zeros((3, 100, 80, 3), np.uint8))[1] == 0
