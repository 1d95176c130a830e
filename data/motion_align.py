"""Re-pose AToM's frontal 3D landmarks onto a reference video and render them as dot videos.

For every reference frame (pose from the Deep3DFaceRecon coefficients, position from FAN):

The geometry (rotation, POS fit, crop projection) lives in :mod:`data.geometry`, shared with
:mod:`data.recon3d`; its public names stay importable from here.

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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.geometry import (
    compute_rotation_matrix,
    de_align,
    lm68_to_lm5,
    pos_fit,
    pose_params,
    project_to_crop,
    rigid_transform,
)
from data.imageops import draw_dots
from moditalker.assets import warn_random_weights
from moditalker.constants import FPS, SAMPLE_RATE
from moditalker.errors import UserError, cli_main, script_prog

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


def read_reference(path: str | Path, max_frames: int | None = None, fps: float = FPS) -> np.ndarray:
    """Reference frames uint8 ``[N, H, W, 3]`` from a video file or a folder of images (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        from data.video import read_frame_folder

        return read_frame_folder(path, max_frames, what="reference frames")
    if not path.exists():
        raise UserError(f"reference video or frames folder not found: {path}")
    from data.video import read_video

    frames, _ = read_video(path, fps=fps, max_frames=max_frames)
    if len(frames) == 0:
        raise UserError(f"{path} has no video frames")
    return frames


def load_frontal(path: str | Path) -> np.ndarray:
    """AToM's frontal landmarks ``[T, 68, 3]`` (``[T, 204]`` accepted) from ``.npy``, checked."""
    from moditalker.fileio import load_npy

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
        prog=script_prog("python -m data.motion_align"),
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
    ap.add_argument(
        "--fps", type=float, default=float(FPS), help=f"frame rate for reading and writing (default {FPS})"
    )
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: align AToM landmarks to a reference video; writes ``aligned_lm68.npy`` + PNGs + mp4."""
    args = build_parser().parse_args(argv)
    from data.imageops import resize_crop
    from data.landmarks import FaceLandmarkDetector, template_face_detector
    from data.recon3d import FaceReconstructor
    from moditalker.config import save_config
    from moditalker.device import resolve_device
    from moditalker.fileio import check_output, save_npy

    out_dir = Path(args.out_dir)
    inputs = (args.landmarks, args.reference, args.audio)
    out_npy = check_output(out_dir / "aligned_lm68.npy", args.overwrite, inputs)
    for side in (*(f"reference_{k}.npy" for k in ("lm68", "coeff", "index")), "config.yaml"):
        check_output(out_dir / side, args.overwrite, inputs)
    png_dir = out_dir / "landmarks_png"
    if not args.no_png and png_dir.exists() and not args.overwrite:
        raise UserError(f"output {png_dir} already exists; pass --overwrite to replace it")
    if not args.no_video:
        check_output(out_dir / "landmarks.mp4", args.overwrite, inputs)
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

        audio = load_audio(args.audio, SAMPLE_RATE)
    frontal = load_frontal(args.landmarks)
    raw = read_reference(args.reference, max_frames=len(frontal), fps=args.fps)
    frames = resize_crop(raw, args.size, device=device)
    if args.random_weights:
        detector = FaceLandmarkDetector(device=device, detector=template_face_detector, max_gap=args.max_gap)
        warn_random_weights(
            "Deep3DFaceRecon is",
            "FAN is a fixed template face and the BFM may be synthetic: the pose is NOT the video's.",
        )
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
        from data.video import write_frame_folder

        # white dots: one channel
        write_frame_folder(png_dir, result["video"][:, 0], overwrite=args.overwrite)
    if not args.no_video:
        from data.video import write_video

        video = np.ascontiguousarray(result["video"].transpose(0, 2, 3, 1))
        write_video(out_dir / "landmarks.mp4", video, fps=args.fps, audio=audio, sample_rate=SAMPLE_RATE)
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
