"""The fixed evaluation protocol: which videos are compared, at which rate and size, frame by frame.

* P and G are two folders of ``.mp4`` files paired by file name (or two ``.mp4`` files).
* Every video is decoded at 25 fps (PyAV, ffmpeg ``fps``-filter semantics, as
  :func:`data.video.read_video`) and resized (not cropped) to 256x256 RGB.
* Frames are aligned by index. A length difference of one frame (encoder rounding) is trimmed to
  the shorter video; more than one frame is an error, never a silent trim.
* Frames are streamed in chunks: no video is ever held in memory whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from data.video import iter_video, media_problem
from moditalker.errors import UserError, describe

FPS = 25
SIZE = 256
MAX_LENGTH_MISMATCH = 1  # frames
VIDEO_SUFFIXES = (".mp4",)


@dataclass(frozen=True)
class VideoPair:
    name: str
    pred: Path
    gt: Path
    frames: int  # frames compared (the shorter of the two at 25 fps)
    pred_frames: int
    gt_frames: int


def _videos_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}


def find_pairs(pred: str | Path, gt: str | Path) -> list[tuple[str, Path, Path]]:
    """``(name, pred_path, gt_path)`` for two folders of mp4 files with the same names, or two files.

    A missing path, an empty folder, or a name present on one side only is a :class:`UserError`.
    """
    pred, gt = Path(pred), Path(gt)
    for path, what in ((pred, "--pred"), (gt, "--gt")):
        if not path.exists():
            raise UserError(f"{what} {path} does not exist; pass a folder of .mp4 files or one .mp4 file")
    if pred.is_file() != gt.is_file():
        raise UserError(f"--pred {pred} and --gt {gt} must both be folders or both be .mp4 files")
    if pred.is_file():
        return [(pred.stem, pred, gt)]
    p, g = _videos_in(pred), _videos_in(gt)
    if not p:
        raise UserError(f"no .mp4 files in --pred folder {pred}")
    if not g:
        raise UserError(f"no .mp4 files in --gt folder {gt}")
    only_p, only_g = sorted(set(p) - set(g)), sorted(set(g) - set(p))
    if only_p or only_g:
        parts = []
        if only_p:
            parts.append(f"{len(only_p)} only in {pred} (e.g. {only_p[0]}.mp4)")
        if only_g:
            parts.append(f"{len(only_g)} only in {gt} (e.g. {only_g[0]}.mp4)")
        raise UserError(f"the video names do not match: {'; '.join(parts)}; every video needs its pair")
    return [(name, p[name], g[name]) for name in sorted(p)]


def _open_video(path: Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise UserError(f"cannot read video {path}: {media_problem(path, exc, 'video')}") from exc
    if not container.streams.video:
        container.close()
        raise UserError(f"{path} has no video stream")
    return container, container.streams.video[0]


def count_frames(path: str | Path, fps: float = FPS) -> int:
    """How many frames :func:`iter_frames` yields for ``path`` at ``fps``, from the packet timestamps
    alone (no decoding), so that a length mismatch is found before any metric runs."""
    path = Path(path)
    container, stream = _open_video(path)
    try:
        tb = stream.time_base
        times = [float(pk.pts * tb) for pk in container.demux(stream) if pk.pts is not None and pk.size]
    except av.FFmpegError as exc:
        raise UserError(f"cannot read video {path}: {describe(exc)}") from exc
    finally:
        container.close()
    if not times:
        raise UserError(f"no frames in video {path}")
    src_rate = float(stream.average_rate) if stream.average_rate else fps
    last = max(times) - min(times)
    return max(int(math.floor((last + 1.0 / src_rate) * fps + 0.5)), int(math.floor(last * fps + 0.5)) + 1)


def iter_frames(path: str | Path, fps: float = FPS, chunk: int = 16) -> Iterator[np.ndarray]:
    """Decode ``path`` at ``fps`` and yield uint8 RGB chunks ``[<=chunk, H, W, 3]``: the frames of
    :func:`data.video.iter_video` (the same resampling as ``read_video``), memory bounded by one chunk."""
    buf: list[np.ndarray] = []
    for frame in iter_video(path, fps=fps):
        buf.append(frame)
        if len(buf) == chunk:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def to_protocol(frames: np.ndarray, device: torch.device, size: int = SIZE) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> uint8 ``[B, 3, size, size]`` on ``device`` (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2)
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)


def make_pairs(
    pred: str | Path, gt: str | Path, fps: float = FPS, max_mismatch: int = MAX_LENGTH_MISMATCH
) -> list[VideoPair]:
    """Pair the videos and check their lengths at ``fps`` (more than ``max_mismatch`` frames apart is
    a :class:`UserError` naming the video)."""
    pairs = []
    for name, p, g in find_pairs(pred, gt):
        n_p, n_g = count_frames(p, fps), count_frames(g, fps)
        check_lengths(name, n_p, n_g, max_mismatch)
        pairs.append(VideoPair(name, p, g, min(n_p, n_g), n_p, n_g))
    return pairs


def check_lengths(name: str, n_pred: int, n_gt: int, max_mismatch: int = MAX_LENGTH_MISMATCH) -> None:
    if abs(n_pred - n_gt) > max_mismatch:
        raise UserError(
            f"{name}: the generated video has {n_pred} frames and the real one {n_gt} at {FPS} fps "
            f"(more than {max_mismatch} apart); frames are compared by index, so trim or regenerate it"
        )


def iter_pair(pair: VideoPair, device: torch.device, chunk: int = 16) -> Iterator[tuple[torch.Tensor, ...]]:
    """Aligned protocol chunks ``(pred, gt)`` (uint8 ``[B, 3, 256, 256]`` on ``device``) of one pair,
    trimmed to the shorter video; the lengths are checked again on the decoded frames."""
    gen_p, gen_g = iter_frames(pair.pred, FPS, chunk), iter_frames(pair.gt, FPS, chunk)
    n_p = n_g = 0
    rest_p: np.ndarray | None = None
    rest_g: np.ndarray | None = None
    while True:
        a = next(gen_p, None) if rest_p is None else rest_p
        b = next(gen_g, None) if rest_g is None else rest_g
        rest_p = rest_g = None
        if a is None or b is None:
            # count what is left of the longer video for the length check
            for extra in gen_p if b is None and a is not None else ():
                n_p += len(extra)
            for extra in gen_g if a is None and b is not None else ():
                n_g += len(extra)
            n_p += len(a) if a is not None else 0
            n_g += len(b) if b is not None else 0
            check_lengths(pair.name, n_p, n_g)
            return
        k = min(len(a), len(b))
        if len(a) > k:
            rest_p = a[k:]
        if len(b) > k:
            rest_g = b[k:]
        n_p += k
        n_g += k
        yield to_protocol(a[:k], device), to_protocol(b[:k], device)
