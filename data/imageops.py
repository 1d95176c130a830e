"""Frame operations shared by the dataset builders, the aligner and MToV: crop/resize, masking, dots.

* :func:`resize_crop` is the original MToV/PVDM preprocessing: centre square crop, then a bilinear
  resize with ``align_corners=False`` and no antialiasing (``F.interpolate``), so values match the
  original's float frames exactly.
* :func:`mask_below_nose` blacks out every row from the nose base (landmark 33) down, as MToV's
  "masked" condition frames.
* :func:`draw_dots` rasterises filled circles exactly as OpenCV's ``cv2.circle(..., thickness=-1)``
  does (it calls it), the way the original renders landmark videos.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from moditalker.errors import UserError

__all__ = ["square_crop_box", "resize_crop", "mask_below_nose", "draw_dots"]


def _check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise UserError(f"{name} must be [T, H, W, 3] RGB frames, got shape {frames.shape}")
    return frames


def square_crop_box(height: int, width: int) -> tuple[int, int, int]:
    """``(top, left, side)`` of the centre square crop :func:`resize_crop` takes."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def resize_crop(
    frames: np.ndarray, size: int = 256, device: str | torch.device = "cpu", batch: int = 64
) -> np.ndarray:
    """Centre-crop ``[T, H, W, 3]`` frames to a square and resize them to ``size`` (bilinear).

    uint8 input gives uint8 output (rounded); float input gives float32 output with exactly the
    original's values (e.g. 153.75), which the MToV data pipeline maps to [-1, 1].
    """
    frames = _check_frames(frames)
    top, left, side = square_crop_box(frames.shape[1], frames.shape[2])
    crop = frames[:, top : top + side, left : left + side]
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, frames.shape[0], batch):
            x = torch.from_numpy(np.ascontiguousarray(crop[i : i + batch])).to(device, torch.float32)
            nchw = x.permute(0, 3, 1, 2).contiguous()  # NCHW like the original (same kernel, same bits)
            y = F.interpolate(nchw, size=(size, size), mode="bilinear", align_corners=False)
            out[i : i + batch] = y.permute(0, 2, 3, 1).cpu().numpy()
    if frames.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def mask_below_nose(frames: np.ndarray, lm68: np.ndarray) -> np.ndarray:
    """Copy of ``frames [T, H, W, 3]`` with rows ``int(lm68[t, 33, 1])`` and below set to 0.

    The nose-base row is clamped to the frame (a landmark above the frame masks everything, one
    below it masks nothing; the original would index from the end for a negative row).
    """
    frames = _check_frames(frames)
    lm68 = np.asarray(lm68)
    if lm68.ndim != 3 or lm68.shape[1:] != (68, 2) or lm68.shape[0] != frames.shape[0]:
        raise UserError(f"landmarks must be [{frames.shape[0]}, 68, 2] for these frames, got {lm68.shape}")
    if not np.isfinite(lm68).all():
        raise UserError("landmarks hold NaN or Inf values (a failed detection?); check where they come from")
    out = frames.copy()
    height = frames.shape[1]
    rows = np.clip(np.trunc(lm68[:, 33, 1]), 0, height).astype(np.int64)
    for t, row in enumerate(rows):
        out[t, row:] = 0
    return out


def draw_dots(points: np.ndarray, size: int | tuple[int, int], radius: int = 3) -> np.ndarray:
    """Filled white circles on black: ``points [T, K, 2]`` integer (x, y) -> uint8 ``[T, H, W]``.

    Pixel for pixel what ``cv2.circle(img, (x, y), radius, 255, -1)`` draws (8-connected, no
    antialiasing); points outside the canvas are clipped by OpenCV.
    """
    points = np.asarray(points)
    if points.ndim != 3 or points.shape[-1] != 2:
        raise UserError(f"points must be [T, K, 2], got shape {points.shape}")
    if not np.isfinite(points).all():
        raise UserError("points hold NaN or Inf values (cannot be drawn); check the landmarks")
    height, width = (size, size) if isinstance(size, int) else size
    # keep far-away points representable as C ints without moving on-canvas ones
    lim = 4 * max(height, width) + radius
    pts = np.clip(points, -lim, lim).astype(np.int64)
    out = np.zeros((points.shape[0], height, width), dtype=np.uint8)
    for t in range(points.shape[0]):
        canvas = out[t]
        for x, y in pts[t]:
            cv2.circle(canvas, (int(x), int(y)), radius, 255, -1)
    return out


def piecewise_affine(
    image: np.ndarray, src: np.ndarray, dst: np.ndarray, triangles: np.ndarray
) -> np.ndarray:
    """Warp ``image`` so that its points ``src [K, 2]`` land on ``dst [K, 2]``: one affine map per
    triangle (``triangles [M, 3]`` indices, a triangulation of ``src``), bilinear, float32 out."""
    h, w = image.shape[:2]
    out = np.zeros((h, w, image.shape[2]), np.float32)
    img = image.astype(np.float32)
    for tri in triangles:
        d = dst[tri].astype(np.float32)
        x0, y0 = np.floor(d.min(0)).astype(int)
        x1, y1 = np.ceil(d.max(0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        m = cv2.getAffineTransform(d - np.float32([x0, y0]), src[tri].astype(np.float32))
        patch = cv2.warpAffine(
            img,
            m,
            (x1 - x0, y1 - y0),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(mask, np.round((d - [x0, y0]) * 16).astype(np.int32), 1, cv2.LINE_8, 4)
        region = out[y0:y1, x0:x1]
        region[mask > 0] = patch[mask > 0]
    return out
