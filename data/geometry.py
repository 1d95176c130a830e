"""Face geometry shared by the 3DMM reconstruction and the motion alignment: Euler rotations, the
5-point reduction of the 68 landmarks, the POS fit to the standard template, and the 224-pixel
Deep3DFaceRecon crop (projection into it and back out of it).
"""

from __future__ import annotations

import numpy as np
import torch

CROP = 224  # Deep3DFaceRecon crop size
HALF_CROP = CROP / 2  # orthographic scale and centre of the crop (112)
RESCALE = 102.0  # Deep3DFaceRecon's rescale factor: s = 102 / POS scale
# 5-point reduction of the 68 iBUG points (0-based): nose tip, eye corners, mouth corners.
_NOSE, _LEYE, _REYE, _LMOUTH, _RMOUTH = 30, (36, 39), (42, 45), 48, 54


def compute_rotation_matrix(angles: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Euler angles ``[N, 3]`` (x, y, z; radians) -> ``(Rz @ Ry @ Rx)^T``, ``[N, 3, 3]``.

    Deep3DFaceRecon's convention: the transposed matrix is applied to row vectors (``v @ R``).
    """
    angles = torch.as_tensor(angles, dtype=torch.float32).reshape(-1, 3)
    x, y, z = angles[:, 0], angles[:, 1], angles[:, 2]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    cx, sx, cy, sy, cz, sz = x.cos(), x.sin(), y.cos(), y.sin(), z.cos(), z.sin()
    rot_x = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).reshape(-1, 3, 3)
    rot_y = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).reshape(-1, 3, 3)
    rot_z = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).reshape(-1, 3, 3)
    return (rot_z @ rot_y @ rot_x).transpose(1, 2)


def rigid_transform(
    vs: np.ndarray | torch.Tensor, rotation: torch.Tensor, translation: np.ndarray | torch.Tensor
) -> torch.Tensor:
    """``vs [N, K, 3] @ rotation [N, 3, 3] + translation [N, 3]`` (row-vector convention)."""
    vs = torch.as_tensor(vs, dtype=torch.float32)
    translation = torch.as_tensor(translation, dtype=torch.float32).reshape(-1, 1, 3)
    return vs @ rotation + translation


def lm68_to_lm5(lm: np.ndarray) -> np.ndarray:
    """68 points ``[..., 68, D]`` -> the 5 POS points ``[..., 5, D]`` (left eye, right eye, nose, mouth
    corners), eye centres as the mean of the two corners; keeps a float dtype (ints give float64)."""
    lm = np.asarray(lm)
    if not np.issubdtype(lm.dtype, np.floating):
        lm = lm.astype(np.float64)
    return np.stack(
        [
            lm[..., _LEYE, :].mean(-2),
            lm[..., _REYE, :].mean(-2),
            lm[..., _NOSE, :],
            lm[..., _LMOUTH, :],
            lm[..., _RMOUTH, :],
        ],
        axis=-2,
    ).astype(lm.dtype)


def pos_fit(points_2d: np.ndarray, points_3d: np.ndarray) -> tuple[np.ndarray, float]:
    """POS: least-squares scaled-orthographic fit of ``points_3d [K, 3]`` onto ``points_2d [K, 2]``.

    Solves ``p = s R[:2] X + t`` linearly (8 unknowns); returns ``(t [2], scale)`` with the scale the
    mean norm of the two fitted rotation rows.
    """
    xp = np.asarray(points_2d, dtype=np.float64)
    x = np.asarray(points_3d, dtype=np.float64)
    n = x.shape[0]
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3], a[0::2, 3] = x, 1.0
    a[1::2, 4:7], a[1::2, 7] = x, 1.0
    k = np.linalg.lstsq(a, xp.reshape(-1), rcond=None)[0]
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3], k[7]]), float(scale)


def pose_params(
    fan_lm68: np.ndarray, lm3d_std: np.ndarray, image_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame crop parameters of Deep3DFaceRecon's alignment: ``t [T, 2]`` and ``s [T]``.

    FAN points are flipped to y-up (``H - 1 - y``, in float32 as the original) before the POS fit;
    ``s = 102 / pos_scale`` is the resize factor that brings the face to the 224 crop.
    """
    height = int(image_hw[0])
    lm5 = lm68_to_lm5(np.asarray(fan_lm68, dtype=np.float32))
    lm5 = np.stack([lm5[..., 0], np.float32(height - 1) - lm5[..., 1]], axis=-1)
    ts, ss = [], []
    for pts in lm5:
        t, scale = pos_fit(pts, lm3d_std)
        ts.append(t)
        ss.append(RESCALE / scale)
    return np.asarray(ts, dtype=np.float64).reshape(-1, 2), np.asarray(ss, dtype=np.float64)


def project_to_crop(posed_lm3d: np.ndarray | torch.Tensor) -> np.ndarray:
    """Orthographic projection into the 224 crop: ``int(x * 112 + 112)`` (y still up), int64 ``[..., 2]``."""
    p = torch.as_tensor(posed_lm3d, dtype=torch.float32)[..., :2]
    return (p * HALF_CROP + HALF_CROP).to(torch.int64).numpy()


def de_align(lm_224: np.ndarray, t: np.ndarray, s: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Map crop pixels ``[T, K, 2]`` back to frame pixels (y still up), float64.

    ``x = (u + w/2 - 112 + t_x - W/2) / s`` with ``w = int(W * s)`` (likewise y with H). The
    original's batched version mixes up the frames' ``w, h`` (it pairs frame f with ``s`` of other
    frames); that only shifts each frame by a constant, which the snap removes, so each frame's
    own size is used here and the final landmarks are identical.
    """
    height, width = int(image_hw[0]), int(image_hw[1])
    s = np.asarray(s, dtype=np.float64).reshape(-1, 1)
    t = np.asarray(t, dtype=np.float64).reshape(-1, 2)
    w = np.trunc(width * s)
    h = np.trunc(height * s)
    lm = np.asarray(lm_224, dtype=np.float64)
    x = (lm[..., 0] + w / 2 - HALF_CROP + t[:, :1] - width / 2) / s
    y = (lm[..., 1] + h / 2 - HALF_CROP + t[:, 1:] - height / 2) / s
    return np.stack([x, y], axis=-1)
