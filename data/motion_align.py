"""Re-pose AToM's frontal 3D landmarks onto a reference video and render them as dot videos.

For every reference frame (pose from the Deep3DFaceRecon coefficients, position from FAN):

1. rotate and translate the frontal BFM landmarks with the frame's Euler angles and translation
   (:func:`compute_rotation_matrix`, :func:`rigid_transform`);
2. project orthographically into the 224-pixel Deep3DFaceRecon crop, ``u = int(x * 112 + 112)``;
3. undo the crop with the frame's POS fit of its 5 FAN points to the standard template
   (:func:`pos_fit`, :func:`de_align`), and flip y (the 3DMM is y-up, images are y-down);
4. snap: translate so the centroid of the 5 key points equals that of the FAN 5 points;
5. truncate to int pixel coordinates.

:func:`render_landmarks` then draws radius-3 white dots on a black square canvas, as the original.

The CLI (``python -m data.motion_align``) runs the whole thing for a landmark file and a reference
video of any length (played back and forth when shorter than the landmarks).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.errors import UserError, cli_main
from data.imageops import draw_dots

__all__ = [
    "compute_rotation_matrix",
    "rigid_transform",
    "lm68_to_lm5",
    "pos_fit",
    "pose_params",
    "project_to_crop",
    "de_align",
    "snap_to",
    "align_landmarks",
    "render_landmarks",
    "pingpong_indices",
    "align_to_reference",
    "read_reference",
    "main",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

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


def snap_to(lm: np.ndarray, target_lm68: np.ndarray) -> np.ndarray:
    """Translate ``lm [T, 68, 2]`` so its 5-point centroid equals that of ``target_lm68``."""
    lm = np.asarray(lm)
    shift = lm68_to_lm5(np.asarray(target_lm68)).mean(-2, keepdims=True) - lm68_to_lm5(lm).mean(
        -2, keepdims=True
    )
    return lm + shift


def align_landmarks(
    frontal_lm3d: np.ndarray | torch.Tensor,
    fan_lm68: np.ndarray,
    coeff: np.ndarray,
    lm3d_std: np.ndarray,
    image_hw: tuple[int, int],
    return_float: bool = False,
) -> np.ndarray:
    """Re-pose frontal BFM landmarks ``[T, 68, 3]`` onto frames: int64 pixel landmarks ``[T, 68, 2]``.

    ``fan_lm68 [T, 68, 2]`` are the frames' 2D landmarks (x, y down), ``coeff [T, 257]`` their
    Deep3DFaceRecon coefficients (only angles 224:227 and translation 254:257 are used),
    ``lm3d_std [5, 3]`` the POS template, ``image_hw`` the frame size. ``return_float`` gives the
    float coordinates before the final truncation.
    """
    frontal = torch.as_tensor(np.asarray(frontal_lm3d), dtype=torch.float32)
    fan = np.asarray(fan_lm68)
    coeff = np.asarray(coeff)
    n = frontal.shape[0]
    if frontal.shape[1:] != (68, 3):
        raise UserError(f"frontal landmarks must be [T, 68, 3], got {tuple(frontal.shape)}")
    if fan.shape != (n, 68, 2) or coeff.shape != (n, 257):
        raise UserError(
            f"need one FAN landmark set [68, 2] and one 257-d coefficient vector per frame for {n} frames, "
            f"got {fan.shape} and {coeff.shape}"
        )
    if not (torch.isfinite(frontal).all() and np.isfinite(fan).all() and np.isfinite(coeff).all()):
        raise UserError("landmarks or 3DMM coefficients contain NaN or inf; check the inputs")
    height = int(image_hw[0])
    rotation = compute_rotation_matrix(coeff[:, 224:227])
    posed = rigid_transform(frontal, rotation, coeff[:, 254:257])
    t, s = pose_params(fan, lm3d_std, image_hw)
    lm = de_align(project_to_crop(posed), t, s, image_hw)
    lm[..., 1] = height - 1 - lm[..., 1]
    lm = snap_to(lm, fan)
    return lm if return_float else np.trunc(lm).astype(np.int64)


def render_landmarks(
    lm68: np.ndarray, image_hw: tuple[int, int], size: int = 256, radius: int = 3
) -> np.ndarray:
    """Landmark video: ``lm68 [T, 68, 2]`` frame pixels -> uint8 ``[T, 3, size, size]`` white dots on black.

    As the original: coordinates truncated to int, scaled by ``size / width`` (both axes), truncated
    again, drawn with ``cv2.circle(radius 3, filled)``.
    """
    lm68 = np.asarray(lm68)
    if lm68.ndim != 3 or lm68.shape[-1] != 2:
        raise UserError(f"landmarks must be [T, K, 2], got shape {lm68.shape}")
    width = int(image_hw[1])
    centres = np.trunc(np.trunc(lm68).astype(np.float64) * size / width)
    dots = draw_dots(centres, size, radius)
    return np.repeat(dots[:, None], 3, axis=1)


def pingpong_indices(n_frames: int, length: int) -> np.ndarray:
    """Frame indices 0, 1, ..., n-1, n-2, ..., 1, 0, 1, ... of length ``length`` (play back and forth)."""
    if n_frames <= 0:
        raise UserError("the reference video has no frames")
    if n_frames == 1:
        return np.zeros(length, dtype=np.int64)
    period = 2 * (n_frames - 1)
    k = np.arange(length) % period
    return np.where(k < n_frames, k, period - k).astype(np.int64)


# ----------------------------------------------------------------------------- whole-video alignment
def align_to_reference(
    frontal_lm3d: np.ndarray,
    frames: np.ndarray,
    detector: Any,
    reconstructor: Any,
    size: int = 256,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Align frontal landmarks ``[T, 68, 3]`` onto reference ``frames [N, S, S, 3]`` of any length N.

    ``detector`` is a :class:`data.landmarks.FaceLandmarkDetector`, ``reconstructor`` a
    :class:`data.recon3d.FaceReconstructor`; each reference frame is analysed once, then played
    back and forth (:func:`pingpong_indices`) when the landmarks outlast the video. Returns
    ``aligned [T, 68, 2]`` int64, ``video [T, 3, size, size]`` uint8, the reference's ``lm68``,
    ``coeff``, the frame index used for each output frame ``ref_index`` and ``n_interpolated``.
    """
    frontal = np.asarray(frontal_lm3d, dtype=np.float32)
    frames = np.asarray(frames)
    hw = frames.shape[1:3]
    lm68, n_interp = detector.detect(frames, progress=progress)
    coeff = reconstructor.reconstruct(frames, lm68, progress=progress)
    idx = pingpong_indices(len(frames), len(frontal))
    aligned = align_landmarks(frontal, lm68[idx], coeff[idx], reconstructor.lm3d_std, hw)
    return {
        "aligned": aligned,
        "video": render_landmarks(aligned, hw, size=size),
        "lm68": np.asarray(lm68, np.float32),
        "coeff": np.asarray(coeff, np.float32),
        "ref_index": idx,
        "n_interpolated": np.int64(n_interp),
    }


def read_reference(path: str | Path, max_frames: int | None = None, fps: float = 25) -> np.ndarray:
    """Reference frames uint8 ``[N, H, W, 3]`` from a video file or a folder of images (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        from data.video import read_image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the frames folder {path}")
        frames = [read_image(p) for p in files[:max_frames]]
        if len({f.shape for f in frames}) > 1:
            raise UserError(f"the images in {path} do not all have the same size")
        return np.stack(frames)
    if not path.exists():
        raise UserError(f"reference video or frames folder not found: {path}")
    from data.video import read_video

    frames, _ = read_video(path, fps=fps, max_frames=max_frames)
    if len(frames) == 0:
        raise UserError(f"{path} has no video frames")
    return frames


def load_frontal(path: str | Path) -> np.ndarray:
    """AToM's frontal landmarks ``[T, 68, 3]`` (``[T, 204]`` accepted) from ``.npy``, checked."""
    from data.fileio import load_npy

    arr = np.asarray(load_npy(path, "frontal landmarks"), dtype=np.float32)
    if arr.ndim == 2 and arr.shape[1] == 204:
        arr = arr.reshape(-1, 68, 3)
    if arr.ndim != 3 or arr.shape[1:] != (68, 3) or len(arr) == 0:
        raise UserError(f"{path}: frontal landmarks must be [T, 68, 3] (AToM output), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise UserError(f"{path}: frontal landmarks contain NaN or inf")
    return arr


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m data.motion_align",
        description="Re-pose AToM's frontal 3D landmarks onto a reference video (pose per frame from "
        "Deep3DFaceRecon, position from FAN), project, snap and render landmark dots.",
    )
    ap.add_argument("--landmarks", required=True, help="AToM frontal landmarks .npy [T, 68, 3]")
    ap.add_argument("--reference", required=True, help="reference video file or folder of frame images")
    ap.add_argument("--out_dir", required=True, help="output folder")
    ap.add_argument(
        "--size", type=int, default=256, help="reference frames are centre-cropped and resized to this"
    )
    ap.add_argument("--audio", default=None, help="optional audio to mux into landmarks.mp4")
    ap.add_argument("--fps", type=float, default=25.0, help="frame rate for reading and writing (default 25)")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    ap.add_argument(
        "--bfm_dir", default=None, help="folder with similarity_Lm3D_all.mat (default checkpoints/BFM)"
    )
    ap.add_argument(
        "--deep3d", default=None, help="Deep3DFaceRecon weights (default checkpoints/deep3d/epoch_20.pth)"
    )
    ap.add_argument(
        "--fan_dir", default=None, help="face_alignment weights folder (default checkpoints/face_alignment)"
    )
    ap.add_argument(
        "--allow_download", action="store_true", help="let face_alignment download missing weights"
    )
    ap.add_argument(
        "--batch_size", type=int, default=16, help="frames per batch for FAN and the 3DMM network"
    )
    ap.add_argument("--max_gap", type=int, default=5, help="longest run of faceless frames to interpolate")
    ap.add_argument("--no_png", action="store_true", help="do not write the per-frame PNGs")
    ap.add_argument("--no_video", action="store_true", help="do not write landmarks.mp4")
    ap.add_argument(
        "--random_weights",
        action="store_true",
        help="smoke test without weights: random 3DMM network, template face instead of FAN",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return ap


def _write_pngs(folder: Path, video: np.ndarray, overwrite: bool) -> None:
    """Write ``video [T, 3, S, S]`` as ``folder/00000.png ...`` via a temp folder renamed at the end."""
    import cv2

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for i, frame in enumerate(tqdm(video, desc="png", leave=False)):
        cv2.imwrite(str(tmp / f"{i:05d}.png"), np.ascontiguousarray(frame[0]))  # white dots: one channel
    if folder.exists() and overwrite:
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: align AToM landmarks to a reference video; writes ``aligned_lm68.npy`` + PNGs + mp4."""
    args = build_parser().parse_args(argv)
    from data.config import save_config
    from data.device import resolve_device
    from data.fileio import check_output, save_npy
    from data.imageops import resize_crop
    from data.landmarks import FaceLandmarkDetector, template_face_detector
    from data.recon3d import FaceReconstructor

    out_dir = Path(args.out_dir)
    out_npy = check_output(out_dir / "aligned_lm68.npy", args.overwrite)
    png_dir = out_dir / "landmarks_png"
    if not args.no_png and png_dir.exists() and not args.overwrite:
        raise UserError(f"output {png_dir} already exists; pass --overwrite to replace it")
    if not args.no_video:
        check_output(out_dir / "landmarks.mp4", args.overwrite)
    if args.size < 32:
        raise UserError("--size must be at least 32")
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise UserError(f"--fps must be a positive number, got {args.fps}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_gap < 0:
        raise UserError(f"--max_gap must be >= 0, got {args.max_gap}")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    audio = None
    if args.audio is not None and not args.no_video:  # read first: a bad file fails before any work
        from data.audio import load_audio

        audio = load_audio(args.audio, 16000)
    frontal = load_frontal(args.landmarks)
    raw = read_reference(args.reference, max_frames=len(frontal), fps=args.fps)
    frames = resize_crop(raw, args.size, device=device)
    if args.random_weights:
        detector = FaceLandmarkDetector(device=device, detector=template_face_detector, max_gap=args.max_gap)
    else:
        detector = FaceLandmarkDetector(
            device=device,
            weights_dir=args.fan_dir,
            allow_download=args.allow_download,
            batch_size=args.batch_size,
            max_gap=args.max_gap,
        )
    recon = FaceReconstructor(
        weights=args.deep3d,
        bfm_dir=args.bfm_dir,
        device=device,
        random_weights=args.random_weights,
        batch_size=args.batch_size,
    )
    result = align_to_reference(frontal, frames, detector, recon, size=args.size, progress=True)
    save_npy(out_npy, result["aligned"])
    save_npy(out_dir / "reference_lm68.npy", result["lm68"])
    save_npy(out_dir / "reference_coeff.npy", result["coeff"])
    save_npy(out_dir / "reference_index.npy", result["ref_index"])
    if not args.no_png:
        _write_pngs(png_dir, result["video"], args.overwrite)
    if not args.no_video:
        from data.video import write_video

        video = np.ascontiguousarray(result["video"].transpose(0, 2, 3, 1))
        write_video(out_dir / "landmarks.mp4", video, fps=args.fps, audio=audio, sample_rate=16000)
    save_config(
        {**vars(args), "n_reference_frames": len(frames), "n_frames": len(frontal)}, out_dir / "config.yaml"
    )
    n_interp = int(result["n_interpolated"])
    print(
        f"aligned {len(frontal)} frames onto {len(frames)} reference frames"
        + (f" ({n_interp} without a face, interpolated)" if n_interp else "")
        + f" in {time.perf_counter() - t0:.1f} s -> {out_dir}"
    )
    return result


if __name__ == "__main__":
    cli_main(main)
