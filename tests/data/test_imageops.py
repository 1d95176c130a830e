"""resize_crop / mask_below_nose / draw_dots against the original's outputs and by construction."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_fixture

from data.imageops import draw_dots, mask_below_nose, resize_crop, square_crop_box
from moditalker.errors import UserError


@pytest.fixture(scope="module")
def ma() -> dict:
    return load_fixture("face3d_seed0.pt")["motion_align"]


def test_resize_crop_matches_original(ma):
    frames = ma["inputs"]["frames_loaded_identity_uint8"].numpy().transpose(0, 2, 3, 1)  # [T, H, W, 3]
    ref = ma["outputs"]["vid"].numpy().transpose(0, 2, 3, 1)
    size = ma["config"]["resolution"]
    out = resize_crop(frames.astype(np.float32), size)
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)  # exact, fractional values included
    out8 = resize_crop(frames, size)
    assert out8.dtype == np.uint8
    assert np.abs(out8.astype(np.float64) - ref).max() <= 0.5


def test_resize_crop_non_square():
    rng = np.random.default_rng(0)
    for h, w in ((40, 64), (64, 40)):
        frames = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8).astype(np.float32)
        top, left, side = square_crop_box(h, w)
        assert side == 40 and (top, left) == ((0, 12) if w > h else (12, 0))
        out = resize_crop(frames, 15, batch=2)
        # the original's layout: the video as [C, T, H, W], channels acting as the batch
        crop = (
            torch.from_numpy(frames[:, top : top + side, left : left + side]).permute(3, 0, 1, 2).contiguous()
        )
        ref = F.interpolate(crop, size=(15, 15), mode="bilinear", align_corners=False).permute(1, 2, 3, 0)
        np.testing.assert_array_equal(out, ref.numpy())
    with pytest.raises(UserError, match=r"\[T, H, W, 3\]"):
        resize_crop(np.zeros((4, 8, 8), np.uint8))


def test_mask_below_nose():
    frames = np.full((3, 20, 10, 3), 200, np.uint8)
    lm = np.zeros((3, 68, 2), np.float32)
    lm[:, 33, 1] = [7.9, -2.0, 25.0]
    out = mask_below_nose(frames, lm)
    assert (out[0, :7] == 200).all() and (out[0, 7:] == 0).all()  # int(7.9) = 7
    assert (out[1] == 0).all()  # nose above the frame: everything masked
    assert (out[2] == 200).all()  # nose below the frame: nothing masked
    assert (frames == 200).all()  # input untouched
    with pytest.raises(UserError, match="68, 2"):
        mask_below_nose(frames, lm[:2])


def test_draw_dots_is_cv2_circle():
    pts = np.array([[[5, 5], [30, 12], [-2, 40], [63, 63], [1000, -1000]]])
    out = draw_dots(pts, 64, radius=3)
    ref = np.zeros((64, 64), np.uint8)
    for x, y in pts[0, :4]:
        cv2.circle(ref, (int(x), int(y)), 3, 255, -1)
    np.testing.assert_array_equal(out[0], ref)
    # one interior dot: symmetric, 7 pixels across, filled
    dot = draw_dots(np.array([[[10, 10]]]), 21)[0] > 0
    assert dot[10, 7:14].all() and not dot[10, 6] and not dot[10, 14]
    assert np.array_equal(dot, dot[::-1]) and np.array_equal(dot, dot.T)
    assert draw_dots(pts, (32, 48)).shape == (1, 32, 48)
