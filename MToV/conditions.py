"""The MToV conditions from a reference and landmarks: what :func:`MToV.generate.generate_video` takes.

* :func:`read_landmark_input`: the ``--landmarks`` input, aligned landmarks ``.npy [T, 68, 2]`` in
  reference-frame pixels (rendered here with :func:`data.motion_align.render_landmarks`) or a folder
  of already rendered landmark frames;
* :func:`read_reference`: the reference, a video or a folder of frames;
* :func:`build_conditions`: (landmark video, reference frames masked below the nose, identity frame)
  from them, the reference played back and forth (:func:`data.motion_align.pingpong_indices`) when it
  is shorter than the landmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from moditalker.constants import FPS
from moditalker.errors import UserError
from moditalker.fileio import load_npy

__all__ = [
    "MToVConditions",
    "build_conditions",
    "condition_settings",
    "read_landmark_input",
    "read_reference",
]


class MToVConditions(NamedTuple):
    """The three inputs of :func:`MToV.generate.generate_video`, uint8 and contiguous."""

    landmark_video: np.ndarray  # [T, 3, R, R] rendered landmarks (R: the model's size, or S)
    masked_frames: np.ndarray  # [T, 3, S, S] reference frames masked below the nose
    identity_frame: np.ndarray  # [3, S, S]


def condition_settings(config) -> tuple[int, int]:
    """(size, dot radius) of the landmark condition a model was trained on: its autoencoder's
    resolution and its config's ``data.landmark_radius`` (else the trainers' default,
    :func:`MToV.dataset.data_defaults`). ``config``: a model config (:func:`MToV.loading.model_config`)
    or the :class:`~MToV.loading.MToVModels` (whose ``config`` is one)."""
    from MToV.dataset import data_defaults

    cfg = getattr(config, "config", config)
    size = int(cfg["autoencoder"]["ddconfig"]["resolution"])
    data = cfg.get("data", None)
    radius = data.get("landmark_radius", None) if data is not None else None
    return size, int(data_defaults(0)["landmark_radius"] if radius is None else radius)


def read_landmark_input(
    path: str | Path,
    image_hw: tuple[int, int],
    size: int,
    *,
    model_size: int | None = None,
    radius: int = 3,
) -> tuple[np.ndarray, np.ndarray | None]:
    """--landmarks: aligned ``.npy [T, 68, 2]`` (rendered here) or a folder of rendered frames.

    ``image_hw`` is the reference frames' size (the landmarks' pixel space), ``size`` the output
    size. Landmarks are rendered as the MToV trainers render them (:class:`MToV.dataset.HDTFClipDataset`:
    :func:`data.motion_align.render_landmarks` at the model's size ``model_size``, default ``size``,
    with dots of ``radius``; :func:`condition_settings` gives both for a model). A folder of frames
    is used as it is when its frames are ``model_size`` square, else resized to ``size`` (such frames
    are then resized again to the model's size and are not what the model was trained on). Returns
    (uint8 [T, 3, R, R] landmark video, the [T, 68, 2] landmarks or None).
    """
    from data.motion_align import render_landmarks
    from data.video import read_frame_folder

    path = Path(path)
    if path.is_dir():
        imgs = read_frame_folder(path, what="landmark frames")
        if imgs.shape[1] != imgs.shape[2]:
            raise UserError(f"landmark frames in {path} must be square, got {imgs.shape[1:3]}")
        video = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
        if video.shape[-1] != size and video.shape[-1] != (model_size or size):
            video = F.interpolate(video, size=(size, size), mode="bilinear", align_corners=False)
        return video.round().clamp(0, 255).to(torch.uint8).numpy(), None
    lm = load_npy(path, "aligned landmarks")
    if lm.ndim != 3 or lm.shape[1:] != (68, 2) or lm.shape[0] == 0:
        raise UserError(f"{path}: aligned landmarks must be [T, 68, 2] pixel coordinates, got {lm.shape}")
    if not np.isfinite(lm).all():
        raise UserError(f"{path}: aligned landmarks contain NaN or inf")
    return render_landmarks(lm, image_hw, size=model_size or size, radius=radius), lm


def read_reference(
    ref_video: str | Path | None = None, ref_frames: str | Path | None = None, fps: float = FPS
) -> np.ndarray:
    """The reference as uint8 ``[N, H, W, 3]``: ``ref_video`` decoded at ``fps``, or the images of the
    folder ``ref_frames`` sorted by name (:func:`data.video.read_frame_folder`)."""
    from data.video import read_frame_folder, read_video

    if ref_video:
        frames, _ = read_video(ref_video, fps=fps)
        return frames
    if ref_frames is None:
        raise UserError("no reference given: pass a reference video or a folder of reference frames")
    return read_frame_folder(ref_frames, what="reference frames")


def build_conditions(
    reference: np.ndarray,
    landmark_video: np.ndarray,
    size: int,
    *,
    landmarks: np.ndarray | None = None,
    ref_landmarks: str | Path | np.ndarray | None = None,
    identity_frame: int = 0,
) -> MToVConditions:
    """(landmark video, masked frames, identity frame) for ``generate_video``.

    ``reference`` uint8 [N, H, W, 3] is played back and forth over the T frames of ``landmark_video``
    (uint8 [T, 3, R, R], R the model's size or ``size``); each of those frames is masked from the nose
    base down and centre-cropped and resized to ``size``. The nose position comes from
    ``ref_landmarks`` (the reference frames' own landmarks [N, 68, 2], an array or a ``.npy`` path)
    when given, else from ``landmarks`` (the aligned [T, 68, 2] landmarks the video was rendered
    from; a rendered PNG folder has none). The identity frame is reference frame ``identity_frame``,
    cropped and resized.
    """
    from data.imageops import mask_below_nose, resize_crop
    from data.motion_align import pingpong_indices

    n = landmark_video.shape[0]
    idx = pingpong_indices(len(reference), n)  # reference played back and forth when shorter
    if ref_landmarks is not None:
        is_path = isinstance(ref_landmarks, str | Path)
        source = ref_landmarks if is_path else "ref_landmarks"
        mask_lm = load_npy(ref_landmarks, "reference landmarks") if is_path else np.asarray(ref_landmarks)
        if mask_lm.ndim != 3 or mask_lm.shape[1:] != (68, 2) or len(mask_lm) != len(reference):
            raise UserError(
                f"{source}: expected [{len(reference)}, 68, 2] (one per reference frame), got {mask_lm.shape}"
            )
        mask_lm = mask_lm[idx]
    elif landmarks is not None:
        mask_lm = landmarks
    else:
        raise UserError("PNG landmark frames carry no nose position: pass --ref_landmarks for the masking")
    if not 0 <= identity_frame < len(reference):
        raise UserError(f"--identity_frame {identity_frame} outside the {len(reference)} reference frames")
    masked = resize_crop(mask_below_nose(reference[idx], mask_lm), size).transpose(0, 3, 1, 2)
    ident = resize_crop(reference[identity_frame : identity_frame + 1], size)[0].transpose(2, 0, 1)
    return MToVConditions(
        np.ascontiguousarray(landmark_video), np.ascontiguousarray(masked), np.ascontiguousarray(ident)
    )
