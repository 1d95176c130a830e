"""Write a small synthetic HDTF-style clip tree for MToV tests (shared by the AE and UNet tests).

Layout written under ``root`` (the one :class:`MToV.dataset.HDTFClipDataset` reads)::

    frames/{id}/{frame:05d}.png                       RGB frames (H x W, not square)
    keypoints/non-face-centric/posed/{id}/{frame:05d}.npy   float32 [68, 2] pixel (x, y)
    heldout_ids.txt                                   ids listed here are the held-out/test ids

Each video shows a face-like ellipse (per-id colours) that drifts and nods, eyes, a mouth that
opens and closes, and a coloured square moving across the background; the 68 landmarks follow the
usual iBUG layout (jaw 0-16, brows 17-26, nose 27-35 with the nose base at 33, eyes 36-47, mouth
48-67), so masking below landmark 33 hides the mouth. Everything is deterministic given ``seed``.

Usage (signature is stable; other test files import it)::

    from mtov_synth import write_synthetic_hdtf
    info = write_synthetic_hdtf(tmp_path / "hdtf")
    info.root, info.ids, info.train_ids, info.heldout_ids, info.split_file
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class SynthHDTF:
    """Where the synthetic tree lives and which ids it holds."""

    root: Path
    frames_dir: Path
    keypoints_dir: Path
    split_file: Path
    ids: tuple[str, ...]
    train_ids: tuple[str, ...]
    heldout_ids: tuple[str, ...]
    n_frames: dict[str, int]
    height: int
    width: int


def face_template68() -> np.ndarray:
    """A face-like 68-point layout in a unit box centred at 0 (x right, y down), float32 [68, 2]."""
    pts = []
    # jaw 0-16: lower half-ellipse from the left temple to the right temple
    for a in np.linspace(np.pi * 0.95, np.pi * 0.05, 17):
        pts.append((-np.cos(a) * 0.5, 0.05 + np.sin(a) * 0.5))
    # brows 17-21 (left), 22-26 (right)
    for x in np.linspace(-0.4, -0.1, 5):
        pts.append((x, -0.28 - 0.05 * np.sin((x + 0.4) / 0.3 * np.pi)))
    for x in np.linspace(0.1, 0.4, 5):
        pts.append((x, -0.28 - 0.05 * np.sin((x - 0.1) / 0.3 * np.pi)))
    # nose bridge 27-30, nostrils 31-35 (33 = nose base, centre)
    for y in np.linspace(-0.2, 0.05, 4):
        pts.append((0.0, y))
    for x in np.linspace(-0.1, 0.1, 5):
        pts.append((x, 0.12 - 0.02 * (abs(x) < 1e-6)))
    # eyes 36-41 (left), 42-47 (right): hexagons
    for cx in (-0.25, 0.25):
        for a in np.linspace(np.pi, -np.pi, 6, endpoint=False):
            pts.append((cx + 0.09 * np.cos(a), -0.15 - 0.04 * np.sin(a)))
    # outer lip 48-59 and inner lip 60-67 (opening applied later)
    for a in np.linspace(np.pi, -np.pi, 12, endpoint=False):
        pts.append((0.18 * np.cos(a), 0.3 - 0.07 * np.sin(a)))
    for a in np.linspace(np.pi, -np.pi, 8, endpoint=False):
        pts.append((0.12 * np.cos(a), 0.3 - 0.03 * np.sin(a)))
    out = np.asarray(pts, dtype=np.float32)
    assert out.shape == (68, 2)
    return out


def _frame_landmarks(template: np.ndarray, centre: np.ndarray, scale: float, mouth_open: float) -> np.ndarray:
    pts = template.copy()
    mouth = slice(48, 68)
    mouth_y = pts[mouth, 1] - 0.3
    pts[mouth, 1] = 0.3 + mouth_y * (1.0 + 2.5 * mouth_open)  # open: stretch the lips vertically
    return (pts * scale + centre).astype(np.float32)


def _draw_frame(
    height: int, width: int, lm: np.ndarray, colours: np.ndarray, box_xy: np.ndarray, scale: float
) -> np.ndarray:
    img = np.empty((height, width, 3), np.uint8)
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    img[:] = np.clip(colours[0] * (0.6 + 0.4 * yy), 0, 255).astype(np.uint8)  # background gradient
    x0, y0 = int(box_xy[0]), int(box_xy[1])
    side = max(3, width // 8)
    cv2.rectangle(img, (x0, y0), (x0 + side, y0 + side), tuple(int(c) for c in colours[1]), -1)
    centre = lm[27:31].mean(0) + np.array([0.0, 0.1 * scale])
    axes = (int(scale * 0.5), int(scale * 0.62))
    cv2.ellipse(img, (int(centre[0]), int(centre[1])), axes, 0, 0, 360, tuple(int(c) for c in colours[2]), -1)
    for eye in (lm[36:42], lm[42:48]):
        cv2.fillPoly(img, [np.round(eye).astype(np.int32)], (30, 30, 30))
    cv2.fillPoly(img, [np.round(lm[48:60]).astype(np.int32)], tuple(int(c) for c in colours[3]))
    cv2.fillPoly(img, [np.round(lm[60:68]).astype(np.int32)], (20, 0, 0))
    cv2.polylines(img, [np.round(lm[27:31]).astype(np.int32)], False, (90, 60, 40), 1)
    return img


def write_synthetic_hdtf(
    root: str | Path,
    ids: Sequence[str] = ("WDA_Synth0_000", "WDA_Synth1_000", "RD_Synth2_000"),
    n_frames: int | Sequence[int] = 24,
    height: int = 48,
    width: int = 64,
    heldout: Sequence[str] = ("RD_Synth2_000",),
    seed: int = 0,
    ext: str = "png",
) -> SynthHDTF:
    """Write the tree described in the module docstring and return where everything is.

    ``n_frames`` is one count for all ids or one per id (to test short videos). ``ext`` is
    ``png`` (lossless, default) or ``jpg`` (as HDTF frames usually are).
    """
    root = Path(root)
    frames_dir = root / "frames"
    kp_dir = root / "keypoints" / "non-face-centric" / "posed"
    counts = [n_frames] * len(ids) if isinstance(n_frames, int) else list(n_frames)
    if len(counts) != len(ids):
        raise ValueError("n_frames must be an int or one count per id")
    rng = np.random.default_rng(seed)
    template = face_template68()
    for vid, n in zip(ids, counts):
        colours = rng.integers(40, 230, size=(4, 3)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, size=4)
        base_scale = min(height, width) * rng.uniform(0.45, 0.55)
        (frames_dir / vid).mkdir(parents=True, exist_ok=True)
        (kp_dir / vid).mkdir(parents=True, exist_ok=True)
        for t in range(n):
            centre = np.array(
                [
                    width / 2 + 0.08 * width * np.sin(0.3 * t + phase[0]),
                    height / 2 + 0.06 * height * np.sin(0.2 * t + phase[1]),
                ],
                dtype=np.float32,
            )
            scale = base_scale * (1.0 + 0.05 * np.sin(0.25 * t + phase[2]))
            mouth_open = 0.5 + 0.5 * np.sin(0.9 * t + phase[3])
            lm = _frame_landmarks(template, centre, scale, mouth_open)
            box = np.array([(t * 3 + phase[0] * 10) % max(1, width - width // 8), height * 0.1])
            img = _draw_frame(height, width, lm, colours, box, scale)
            cv2.imwrite(str(frames_dir / vid / f"{t:05d}.{ext}"), img[:, :, ::-1])
            np.save(kp_dir / vid / f"{t:05d}.npy", lm)
    split_file = root / "heldout_ids.txt"
    split_file.write_text("".join(f"{i}\n" for i in heldout))
    return SynthHDTF(
        root=root,
        frames_dir=frames_dir,
        keypoints_dir=kp_dir,
        split_file=split_file,
        ids=tuple(ids),
        train_ids=tuple(i for i in ids if i not in set(heldout)),
        heldout_ids=tuple(heldout),
        n_frames=dict(zip(ids, counts)),
        height=height,
        width=width,
    )
