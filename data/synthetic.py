"""A synthetic talking-face world whose right answers are known: ``python -m data.synthetic --out DIR``.

From one face photo (default: the bundled sample face of :mod:`data.sample_data`, scikit-image's
astronaut; any square face photo with ``--face``) and speech-like audio synthesised here, it makes
videos whose motion is a known function of the audio:

* **speech**: "sentences" of voiced syllables (a glottal-like harmonic source with a moving pitch,
  shaped by two or three vowel formants, with optional noise-burst consonants), grouped into words
  and phrases with pauses, each sentence from its own random generator (:func:`synth_sentence`);
* **mouth**: the opening of frame ``t`` is the sentence's loudness envelope (RMS per 40 ms video
  frame in dB relative to the sentence's loudest frame, mapped from -30 dB (closed) to -6 dB (fully
  open), smoothed over 5 frames) delayed by :data:`LAG_FRAMES` frames (:func:`mouth_opening`);
* **landmarks**: the 68 landmarks of the face (the canonical face of :func:`data.face3d.canonical_face_lm68`
  fitted to the photo by an affine map, or landmarks the user gives with ``--landmarks``) with the
  lower lip and the jaw moved down, the upper lip slightly up and the corners slightly in, in
  proportion to the opening (:data:`MOUTH_PATTERN`, in the BFM units the 3D landmarks use), plus an
  optional small head motion (``--head_motion``);
* **frames**: the photo warped with a piecewise-affine warp (scikit-image) from its own landmarks to
  the frame's, with a dark mouth interior drawn between the parted inner lips, rendered at the
  photo's size and area-resized to ``--size``.

It writes the formats the trainers read, with the ground truth standing in for FAN and the 3DMM fit:

* ``hdtf/``: the HDTF-style tree of :mod:`data.preprocess` (``frames/{id}/%05d.png``,
  ``keypoints/non-face-centric/posed/{id}/%05d.npy`` pixel landmarks, ``keypoints/face-centric/unposed``
  3D landmarks, ``audio/{id}.wav``, ``hubert/{id}.npy``, ``meta/{id}.json`` last) and
  ``hdtf/heldout_ids.txt`` listing the held-out ids (``data.split_file``, the default ``heldout`` mode);
* ``atom/{train,val}/{id}.npz``: AToM's LRS3-style clips (``hubert [2T, D]``, ``idexp_lm3d [T, 68, 3]``
  = 10 x the frontal 3D landmarks' offsets from the mean shape), ``val`` = the held-out sentences;
* ``world.json``: the settings and, per clip, its split and the true mouth opening per frame;
* optionally ``videos/{id}.mp4`` (frames + audio, what ``data.preprocess`` reads; ``--videos``).

HuBERT: the real HuBERT-large weights are not needed: the features come from the small random HuBERT
the pipeline uses with ``--random_weights`` (:meth:`data.audio.HubertExtractor.random`, fixed seed),
a deterministic function of the audio that still carries when the sound is loud (see
``hubert_loudness_r2`` in ``world.json``: how much of the loudness a linear read-out of the features
recovers). The held-out split holds other sentences (other random generators) of the same face.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.imageops import piecewise_affine
from data.sample_data import SAMPLE_VIDEO_BOX
from data.synthetic_speech import (  # noqa: F401 - the world's speech, re-exported
    LAG_FRAMES,
    OPEN_DB,
    SMOOTH_FRAMES,
    loudness_db,
    mouth_opening,
    synth_sentence,
)
from moditalker.constants import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from moditalker.errors import UserError, cli_main

__all__ = [
    "LAG_FRAMES",
    "MOUTH_PATTERN",
    "Face",
    "clip_landmarks",
    "crop_face",
    "load_face",
    "lip_box",
    "loudness_db",
    "main",
    "mouth_gap3d",
    "mouth_opening",
    "mouth_pattern",
    "render_frames",
    "synth_sentence",
    "write_world",
]

OPEN_BFM = 0.1  #: lower-lip travel of a fully open mouth in BFM units (the face is about 1.4 units tall)
# the bundled face: scikit-image's astronaut (as data.sample_data), cropped to the face as HDTF's
# frames are (a 180-pixel square of the 512x512 photo around the head centre)
ASTRONAUT_BOX = (135, 40, 315, 220)

# per-landmark displacement of a fully open mouth in units of OPEN_BFM: (index, dx, dy), y up
_PATTERN = (
    [(i, 0.0, -w) for i, w in zip(range(55, 60), (0.6, 0.95, 1.0, 0.95, 0.6))]  # outer lower lip
    + [(i, 0.0, -w) for i, w in zip(range(65, 68), (0.9, 1.0, 0.9))]  # inner lower lip
    + [(i, 0.0, 0.12) for i in (61, 62, 63)]  # inner upper lip: slightly up
    + [(i, 0.0, 0.08) for i in (50, 51, 52)]  # outer upper lip
    + [(48, 0.1, -0.35), (60, 0.1, -0.35), (54, -0.1, -0.35), (64, -0.1, -0.35)]  # corners: in, down
    + [(i, 0.0, -0.85 * max(0.0, 1.0 - abs(i - 8) / 6.0) ** 1.5) for i in range(3, 14)]  # jaw, chin 8
)


def mouth_pattern() -> np.ndarray:
    """Displacement of the 68 frontal 3D landmarks for a fully open mouth, BFM units, ``[68, 3]``."""
    pattern = np.zeros((68, 3), np.float64)
    for i, dx, dy in _PATTERN:
        pattern[i, 0] += dx * OPEN_BFM
        pattern[i, 1] += dy * OPEN_BFM
    return pattern


MOUTH_PATTERN = mouth_pattern()


def mouth_gap3d(lm3d: np.ndarray) -> np.ndarray:
    """Mouth opening read back from frontal 3D landmarks ``[..., 68, 3]`` (y up): the mean height of
    the inner upper lip (61-63) over the inner lower lip (67-65), in BFM units."""
    lm3d = np.asarray(lm3d)
    return (lm3d[..., [61, 62, 63], 1] - lm3d[..., [67, 66, 65], 1]).mean(-1)


# ------------------------------------------------------------------------------------------------
# speech

# ------------------------------------------------------------------------------------------------
# face, landmarks, frames


@dataclass
class Face:
    """A face photo with its 68 landmarks and the affine map from frontal BFM units to its pixels."""

    image: np.ndarray  # uint8 [S, S, 3]
    landmarks: np.ndarray  # float64 [68, 2] pixels (x, y down)
    affine: np.ndarray  # [2, 3]: pixels = affine @ (x, y, 1) of frontal BFM points (y up)

    def project(self, lm3d_offset: np.ndarray) -> np.ndarray:
        """Pixel landmarks ``[..., 68, 2]`` of frontal 3D offsets ``[..., 68, 3]`` from the mean shape."""
        return self.landmarks + np.asarray(lm3d_offset)[..., :2] @ self.affine[:, :2].T


def _fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    a = np.concatenate([src, np.ones((len(src), 1))], 1)
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return sol.T  # [2, 3]


def astronaut_image(size: int = 256) -> np.ndarray:
    """The bundled face: the astronaut cropped to :data:`ASTRONAUT_BOX`, uint8 ``[size, size, 3]``."""
    from PIL import Image
    from skimage import data as skdata

    crop = Image.fromarray(skdata.astronaut()).crop(ASTRONAUT_BOX).resize((size, size), Image.BICUBIC)
    return np.asarray(crop, dtype=np.uint8)


def astronaut_landmarks(size: int = 256) -> np.ndarray:
    """The canonical face placed on :func:`astronaut_image` (fitted by eye on the pipeline's sample
    crop: the pipeline's template face with its height scaled by 0.79 about the mouth, then mapped
    into this crop), ``[68, 2]`` pixels at ``size``."""
    from data.face3d import canonical_face_lm68

    xy = canonical_face_lm68()[:, :2]
    x = 128 + xy[:, 0] * 0.3 * 256
    y = 0.45 * 256 - xy[:, 1] * 0.3 * 256
    y = 145.0 + (y - 145.0) * 0.79  # in the 256-pixel sample crop
    left, top, right, _ = SAMPLE_VIDEO_BOX
    scale = (right - left) / 256
    px, py = left + x * scale, top + y * scale  # in the 512x512 photo
    x0, y0, x1, _ = ASTRONAUT_BOX
    k = size / (x1 - x0)
    return np.stack([(px - x0) * k, (py - y0) * k], 1)


def load_face(face: str | Path | None = None, landmarks: str | Path | None = None) -> Face:
    """The photo (default: the bundled astronaut crop at 256) and its landmarks (default: fitted
    canonical face for the astronaut; required for another photo: ``.npy [68, 2]`` pixels)."""
    from data.face3d import canonical_face_lm68

    if face is None:
        image = astronaut_image(256)
        lm = astronaut_landmarks(256) if landmarks is None else None
    else:
        from PIL import Image

        path = Path(face)
        if not path.is_file():
            raise UserError(f"face image not found: {path}")
        try:
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            raise UserError(f"cannot read face image {path}: {exc}") from exc
        if image.shape[0] != image.shape[1] or image.shape[0] < 64:
            raise UserError(
                f"the face image must be square and at least 64x64, got {image.shape[1]}x{image.shape[0]}"
            )
        lm = None
        if landmarks is None:
            raise UserError("--face needs --landmarks: a .npy [68, 2] of the photo's landmarks (pixels)")
    if landmarks is not None:
        from moditalker.fileio import load_npy

        lm = load_npy(landmarks, "face landmarks")
        if lm.shape != (68, 2) or not np.isfinite(lm).all():
            raise UserError(f"{landmarks}: face landmarks must be a finite [68, 2] array, got {lm.shape}")
    lm = np.asarray(lm, np.float64)
    return Face(image=image, landmarks=lm, affine=_fit_affine(canonical_face_lm68()[:, :2], lm))


def crop_face(face: Face, box: tuple[int, int, int, int], size: int = 256) -> Face:
    """``face`` cropped to the square ``box`` (x0, y0, x1, y1 pixels) and resized to ``size``, with its
    landmarks and projection carried along (landmarks may fall outside the crop)."""
    from PIL import Image

    x0, y0, x1, y1 = box
    if x1 - x0 != y1 - y0 or x1 <= x0:
        raise UserError(f"the crop box must be a square, got {box}")
    k = size / (x1 - x0)
    image = np.asarray(Image.fromarray(face.image).crop(box).resize((size, size), Image.BICUBIC), np.uint8)
    affine = face.affine * k
    affine[:, 2] = (face.affine[:, 2] - np.array([x0, y0])) * k
    return Face(image=image, landmarks=(face.landmarks - np.array([x0, y0])) * k, affine=affine)


def head_motion(n: int, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Small smooth head motion: per frame (angle in rad, dx, dy in face-size fractions), ``[T, 3]``."""
    t = np.arange(n) / FPS
    out = np.zeros((n, 3))
    for j, scale in enumerate((math.radians(2.0), 0.015, 0.01)):
        f, ph = rng.uniform(0.15, 0.5), rng.uniform(0, 2 * np.pi)
        out[:, j] = amount * scale * np.sin(2 * np.pi * f * t + ph)
    return out


def clip_landmarks(
    face: Face, opening: np.ndarray, motion: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(pixel landmarks ``[T, 68, 2]`` at the photo's size, frontal 3D offsets ``[T, 68, 3]``)."""
    offsets = np.asarray(opening)[:, None, None] * MOUTH_PATTERN[None]
    lm = face.project(offsets)
    if motion is not None:
        size = face.image.shape[0]
        centre = face.landmarks.mean(0)
        for t, (a, dx, dy) in enumerate(motion):
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            lm[t] = (lm[t] - centre) @ rot.T + centre + np.array([dx, dy]) * size
    return lm, offsets


def _border(size: int) -> np.ndarray:
    s = size - 1
    pts = [(x, y) for x in (0, s / 2, s) for y in (0, s / 2, s) if (x, y) != (s / 2, s / 2)]
    return np.asarray(pts, np.float64)


def _triangles(points: np.ndarray) -> np.ndarray:
    from scipy.spatial import Delaunay

    return Delaunay(points).simplices


MOUTH_COLOUR = np.array([45, 12, 18], np.float64)  #: the dark mouth interior (RGB)


def render_frames(face: Face, lm: np.ndarray, opening: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[T, size, size, 3]``: the photo warped from its landmarks to each frame's ``lm`` (pixels
    at the photo's size; piecewise affine over a Delaunay triangulation of the landmarks and the
    photo's border), the mouth interior darkened between the parted inner lips, area-resized."""
    import cv2

    src_size = face.image.shape[0]
    border = _border(src_size)
    src = np.concatenate([face.landmarks, border])
    triangles = _triangles(src)
    out = np.empty((len(lm), size, size, 3), np.uint8)
    for t in range(len(lm)):
        dst = np.concatenate([lm[t], border])
        frame = piecewise_affine(face.image, src, dst, triangles).astype(np.float64)
        gap = float(opening[t])
        if gap > 0.02:  # the dark interior: between the inner upper lip and the parted inner lower lip
            poly = lm[t, 60:68]  # 60-64 upper (left to right), 65-67 lower (right to left)
            mask = np.zeros((src_size, src_size), np.uint8)
            cv2.fillPoly(mask, [np.round(poly * 4).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=2)
            alpha = (mask.astype(np.float64) / 255.0 * min(1.0, gap / 0.3))[..., None]
            frame = frame * (1 - alpha) + MOUTH_COLOUR * alpha
        frame = np.clip(np.round(frame), 0, 255).astype(np.uint8)
        out[t] = frame if size == src_size else cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return out


def lip_box(face: Face, size: int, margin: float = 0.25) -> tuple[int, int, int, int]:
    """A fixed box around the lips and their full travel, ``(x0, y0, x1, y1)`` pixels at ``size``
    (the mouth landmarks at rest and fully open, widened by ``margin`` of the mouth width)."""
    lm = np.concatenate([face.project(np.zeros((68, 3))), face.project(MOUTH_PATTERN)])[:, :]
    mouth = np.concatenate([lm[48:68], lm[68 + 48 : 68 + 68]]) * size / face.image.shape[0]
    (x0, y0), (x1, y1) = mouth.min(0), mouth.max(0)
    pad = margin * (x1 - x0)
    box = (x0 - pad, y0 - pad, x1 + pad, y1 + pad)
    return tuple(int(np.clip(round(v), 0, size)) for v in box)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# the world on disk


def clip_ids(seed: int, n_train: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """Ids of the training and held-out sentences (each id's audio comes from generator (seed, i))."""
    ids = [f"syn{seed}_{i:03d}" for i in range(n_train + n_heldout)]
    return ids[:n_train], ids[n_train:]


def write_world(
    out: str | Path,
    *,
    face: Face | None = None,
    seed: int = 0,
    n_train: int = 48,
    n_heldout: int = 8,
    n_render: int | None = 16,
    size: int = 256,
    seconds: tuple[float, float] = (3.0, 5.0),
    hubert_dim: int = 16,
    head: float = 0.0,
    videos: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the world described in the module doc into ``out`` and return its ``world.json`` record.

    ``n_train`` training sentences (all in the AToM data), ``n_heldout`` held-out ones; ``n_render``
    of the training sentences (None: all) and every held-out one are rendered into the HDTF tree.
    ``head`` scales the small head motion (0: none). ``size``: frame size of the tree.
    """
    import cv2
    from tqdm.auto import tqdm

    from data.audio import HubertExtractor, save_wav
    from data.face3d import canonical_face_lm68
    from moditalker.fileio import atomic_path, atomic_write_text

    out = Path(out)
    if (out / "world.json").exists() and not overwrite:
        raise UserError(f"{out / 'world.json'} already exists; pass --overwrite to rebuild the world")
    if n_train < 1 or n_heldout < 1:
        raise UserError(
            f"need at least one training and one held-out sentence, got {n_train} and {n_heldout}"
        )
    if size < 32:
        raise UserError(f"--size must be at least 32, got {size}")
    if hubert_dim < 4 or hubert_dim % 4:
        raise UserError(f"--hubert_dim must be a positive multiple of 4, got {hubert_dim}")
    face = face if face is not None else load_face()
    src_size = face.image.shape[0]
    hub = HubertExtractor.random(hidden_size=hubert_dim)  # the pipeline's --random_weights HuBERT
    train_ids, heldout_ids = clip_ids(seed, n_train, n_heldout)
    render = set(train_ids if n_render is None else train_ids[:n_render]) | set(heldout_ids)
    hdtf, atom = out / "hdtf", out / "atom"
    if overwrite and ((out / "world.json").exists() or (hdtf / "meta").is_dir()):
        # a new world: nothing of the old one stays (another seed's clips, longer frame folders)
        (out / "world.json").unlink(missing_ok=True)
        for old in (hdtf, atom, out / "videos"):
            shutil.rmtree(old, ignore_errors=True)
    kp = hdtf / "keypoints"
    mean3d = canonical_face_lm68()
    clips: dict[str, dict] = {}
    feats_all, db_all = [], []
    for i, cid in enumerate(tqdm(train_ids + heldout_ids, desc="synthetic world", disable=not progress)):
        split = "train" if cid in train_ids else "heldout"
        wave = synth_sentence([seed, i], seconds)
        feats = hub(wave, name=cid)
        n = min(len(wave) // SAMPLES_PER_FRAME, feats.shape[0] // 2)
        feats, wave = feats[: 2 * n], wave[: n * SAMPLES_PER_FRAME]
        opening = mouth_opening(wave, n)
        motion = head_motion(n, np.random.default_rng([seed, i, 1]), head) if head > 0 else None
        lm, offsets = clip_landmarks(face, opening, motion)
        idexp = (10.0 * offsets).astype(np.float32)
        if split == "train":
            feats_all.append(feats.reshape(n, -1))
            db_all.append(loudness_db(wave, n))
        folder = atom / ("train" if split == "train" else "val")
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{cid}.npz", suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, hubert=feats.astype(np.float32), idexp_lm3d=idexp)
        clips[cid] = {
            "split": split,
            "frames": n,
            "rendered": cid in render,
            "opening": np.round(opening, 5).tolist(),
        }
        if cid not in render:
            continue
        if (hdtf / "meta" / f"{cid}.json").is_file() and not overwrite:
            continue
        frames = render_frames(face, lm, opening, size)
        lm_px = (lm * size / src_size).astype(np.float32)
        dirs = {
            "frames": hdtf / "frames" / cid,
            "posed": kp / "non-face-centric" / "posed" / cid,
            "unposed": kp / "face-centric" / "unposed" / cid,
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for t in range(n):
            with atomic_path(dirs["frames"] / f"{t:05d}.png", suffix=".png") as tmp:
                cv2.imwrite(str(tmp), frames[t][:, :, ::-1])
            with atomic_path(dirs["posed"] / f"{t:05d}.npy", suffix=".npy") as tmp:
                np.save(tmp, lm_px[t])
            with atomic_path(dirs["unposed"] / f"{t:05d}.npy", suffix=".npy") as tmp:
                np.save(tmp, (mean3d + offsets[t]).astype(np.float32))
        (hdtf / "audio").mkdir(parents=True, exist_ok=True)
        (hdtf / "hubert").mkdir(parents=True, exist_ok=True)
        save_wav(hdtf / "audio" / f"{cid}.wav", wave)
        with atomic_path(hdtf / "hubert" / f"{cid}.npy", suffix=".npy") as tmp:
            np.save(tmp, feats.astype(np.float32))
        if videos:
            from data.video import write_video

            (out / "videos").mkdir(parents=True, exist_ok=True)
            write_video(out / "videos" / f"{cid}.mp4", frames, fps=FPS, audio=wave, sample_rate=SAMPLE_RATE)
        (hdtf / "meta").mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            hdtf / "meta" / f"{cid}.json", json.dumps({"id": cid, "frames": n, "synthetic": True})
        )
    atomic_write_text(hdtf / "heldout_ids.txt", "".join(f"{c}\n" for c in heldout_ids))
    record = {
        "seed": seed,
        "size": size,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "hubert_dim": hubert_dim,
        "lag_frames": LAG_FRAMES,
        "open_db": list(OPEN_DB),
        "open_bfm": OPEN_BFM,
        "head_motion": head,
        "lip_box": list(lip_box(face, size)),
        "face_landmarks": np.round(face.landmarks, 3).tolist(),
        "face_affine": face.affine.tolist(),
        "face_size": src_size,
        "hubert_loudness_r2": _linear_r2(feats_all, db_all),
        "train_ids": train_ids,
        "heldout_ids": heldout_ids,
        "clips": clips,
    }
    atomic_write_text(out / "world.json", json.dumps(record))
    return record


def _linear_r2(feats: list[np.ndarray], target: list[np.ndarray], ctx: int = 2) -> float | None:
    """R^2 of a ridge read-out of the loudness (dB) from the HuBERT features of +-ctx frames,
    fitted on the first 3/4 of the sentences and scored on the rest (None with fewer than 4)."""
    if len(feats) < 4:
        return None

    def stack(x: np.ndarray) -> np.ndarray:
        p = np.pad(x, ((ctx, ctx), (0, 0)), mode="edge")
        return np.concatenate([p[i : i + len(x)] for i in range(2 * ctx + 1)] + [np.ones((len(x), 1))], 1)

    k = len(feats) * 3 // 4
    a, b = np.concatenate([stack(f) for f in feats[:k]]), np.concatenate(target[:k])
    c, d = np.concatenate([stack(f) for f in feats[k:]]), np.concatenate(target[k:])
    return round(ridge_r2(a, b, c, d, 1e-2), 4)


def ridge_r2(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, lam: float) -> float:
    """R^2 on (``x_test``, ``y_test``) of the ridge regression (penalty ``lam``) fitted on (``x``, ``y``)."""
    w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
    return float(1.0 - ((x_test @ w - y_test) ** 2).sum() / max(((y_test - y_test.mean()) ** 2).sum(), 1e-12))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="A synthetic talking-face world with known answers (HDTF-style tree + AToM clips).",
    )
    p.add_argument("--out", required=True, help="output folder (hdtf/, atom/, world.json)")
    p.add_argument("--face", default=None, help="square face photo (default: the bundled astronaut crop)")
    p.add_argument("--landmarks", default=None, help=".npy [68, 2] landmarks of --face (pixels)")
    p.add_argument("--seed", type=int, default=0, help="sentences come from generators (seed, i) [0]")
    p.add_argument("--train", type=int, default=48, help="training sentences [48]")
    p.add_argument("--heldout", type=int, default=8, help="held-out sentences [8]")
    p.add_argument(
        "--render", type=int, default=16, help="training sentences rendered as video, -1 = all [16]"
    )
    p.add_argument("--size", type=int, default=256, help="frame size of the HDTF tree [256]")
    p.add_argument("--hubert_dim", type=int, default=16, help="width of the random HuBERT's features [16]")
    p.add_argument(
        "--head_motion", type=float, default=0.0, help="scale of a small head motion, 0 = none [0]"
    )
    p.add_argument("--videos", action="store_true", help="also write videos/{id}.mp4 with sound")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing world")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    face = load_face(args.face, args.landmarks)
    record = write_world(
        args.out,
        face=face,
        seed=args.seed,
        n_train=args.train,
        n_heldout=args.heldout,
        n_render=None if args.render < 0 else args.render,
        size=args.size,
        hubert_dim=args.hubert_dim,
        head=args.head_motion,
        videos=args.videos,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    rendered = sum(c["rendered"] for c in record["clips"].values())
    print(
        f"world: {len(record['train_ids'])} training + {len(record['heldout_ids'])} held-out sentences, "
        f"{rendered} rendered at {record['size']}x{record['size']} -> {args.out} "
        f"(loudness from HuBERT, linear R^2 {record['hubert_loudness_r2']})"
    )
    return record


if __name__ == "__main__":
    cli_main(main)
