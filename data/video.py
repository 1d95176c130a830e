"""Video and image I/O with PyAV: decode to uint8 frames at a fixed fps, write H.264 mp4 with AAC audio.

Everything in the project runs at 25 fps (two HuBERT frames per video frame), so ``read_video``
resamples any input to the requested rate by presentation timestamps, the way ffmpeg's ``fps``
filter does (each output slot shows the latest input frame whose timestamp rounds to it), without
re-encoding anything to disk. ``write_video`` writes atomically: a temp file beside the target,
renamed on success, so a crash never leaves a half-written mp4 at the output path.

Both have streaming forms for videos of any length: :func:`iter_video` yields the frames as they are
decoded, :class:`VideoWriter` encodes frames batch by batch (same file as ``write_video``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from moditalker.constants import FPS, SAMPLE_RATE
from moditalker.errors import UserError, bytes_in, describe, disk_full_as
from moditalker.fileio import atomic_path, current_umask, require_file

__all__ = [
    "read_video",
    "iter_video",
    "read_image",
    "read_frame_folder",
    "write_frame_folder",
    "write_video",
    "VideoWriter",
    "probe",
    "frame_times",
    "media_problem",
]


def _open(path: str | Path, what: str = "video") -> av.container.InputContainer:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a {what} file")
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        kind = "video" if what == "video" else "audio or video"
        raise UserError(f"cannot read {what} {path}: {media_problem(path, exc, kind)}") from exc


def media_problem(path: str | Path, exc: BaseException, kind: str = "audio or video") -> str:
    """Why a decoder refused ``path``, in words: an empty file, a file that is no media at all (FFmpeg's
    ``[Errno 1094995529] Invalid data found ...``), or the decoder's own first line."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(exc, av.InvalidDataError) or "Invalid data found" in str(exc):
        article = "an" if kind[0] in "aeiou" else "a"
        return f"not {article} {kind} file that FFmpeg can decode (another format, or damaged)"
    return f"{describe(exc)}; is it a valid {kind} file?"


def _check_fps(fps: float) -> None:
    if not (math.isfinite(fps) and fps > 0):
        raise UserError(f"fps must be a positive number, got {fps}")


def frame_times(n_frames: int, fps: float) -> np.ndarray:
    """Timestamps (seconds) of ``n_frames`` frames at ``fps``, starting at 0."""
    return np.arange(n_frames, dtype=np.float64) / float(fps)


def iter_video(
    path: str | Path,
    fps: float | None = FPS,
    max_frames: int | None = None,
    autorotate: bool = True,
    info: dict[str, Any] | None = None,
) -> Iterator[np.ndarray]:
    """The frames :func:`read_video` returns, one uint8 RGB ``[H, W, 3]`` array at a time, decoded as
    they are consumed (a long or large video is never held whole). ``info`` (a dict, optional)
    receives ``"fps"``, the rate of the frames, before the first one is yielded. A repeated frame
    (``fps`` above the source rate) is the same array object each time it is yielded."""
    frames = _decode_frames(Path(path), fps, autorotate, info)
    with contextlib.closing(frames):  # stopping at max_frames closes the file at once
        # max_frames below 1 still gives the first frame
        yield from itertools.islice(frames, None if max_frames is None else max(max_frames, 1))


def _decode_frames(
    path: Path, fps: float | None, autorotate: bool, info: dict[str, Any] | None
) -> Iterator[np.ndarray]:
    """:func:`iter_video` without ``max_frames``."""
    if fps is not None:
        _check_fps(fps)
    container = _open(path)
    try:
        if not container.streams.video:
            raise UserError(f"{path} has no video stream; pass a video file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_rate = float(stream.average_rate) if stream.average_rate else None
        if info is not None:
            info["fps"] = float(fps) if fps is not None else (src_rate or float(FPS))
        time_base = stream.time_base
        start = None
        prev: np.ndarray | None = None  # latest decoded frame not yet placed
        prev_slot = 0
        last_time = 0.0
        n_decoded = 0
        try:
            for frame in container.decode(stream):
                image = frame.to_ndarray(format="rgb24")
                if autorotate and frame.rotation:  # counter-clockwise degrees from the display matrix
                    image = np.ascontiguousarray(np.rot90(image, k=int(round(frame.rotation / 90)) % 4))
                n_decoded += 1
                if fps is None:
                    yield image
                    continue
                if frame.pts is not None and time_base is not None:
                    t = float(frame.pts * time_base)
                elif frame.time is not None:
                    t = float(frame.time)
                else:  # no timestamps at all: assume a constant rate
                    t = (n_decoded - 1) / (src_rate or fps)
                if start is None:
                    start = t
                t -= start
                last_time = max(last_time, t)
                slot = max(int(math.floor(t * fps + 0.5)), 0)
                if prev is not None:
                    # the previous frame fills every slot up to (not including) this frame's slot
                    while prev_slot < slot:
                        yield prev
                        prev_slot += 1
                    prev_slot = max(prev_slot, slot)
                else:
                    prev_slot = 0  # the first frame covers slot 0 even with a late start
                prev = image
        except av.FFmpegError as exc:
            if n_decoded == 0:
                raise UserError(f"cannot decode video {path}: {exc}") from exc
            # a truncated or partly corrupt file: keep what decoded
        if fps is not None and prev is not None:
            frame_dur = 1.0 / src_rate if src_rate else 1.0 / fps
            total = max(int(math.floor((last_time + frame_dur) * fps + 0.5)), prev_slot + 1)
            while prev_slot < total:
                yield prev
                prev_slot += 1
    finally:
        container.close()
    if n_decoded == 0:  # (a decoded frame is always yielded at least once)
        raise UserError(f"no frames could be decoded from {path}; is it a valid video file?")


def read_video(
    path: str | Path, fps: float | None = FPS, max_frames: int | None = None, autorotate: bool = True
) -> tuple[np.ndarray, float]:
    """Decode the first video stream of ``path`` to uint8 RGB frames ``[T, H, W, 3]``.

    With ``fps`` set (default 25) frames are dropped or repeated by presentation timestamp so
    that output frame ``k`` shows the latest input frame whose time rounds to ``k / fps``
    (ffmpeg ``fps`` filter semantics); the clip keeps its duration: ``T = round(duration * fps)``.
    With ``fps=None`` every decoded frame is returned with the stream's own average rate.
    ``max_frames`` stops decoding early (e.g. when only as many frames as the audio are needed).
    ``autorotate`` applies the stream's display rotation (phone videos), as ffmpeg does by default.
    Returns ``(frames, fps)``. :func:`iter_video` gives the same frames one at a time.
    """
    info: dict[str, Any] = {}
    frames = list(iter_video(path, fps, max_frames, autorotate, info))
    return np.stack(frames), info["fps"]


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB ``[H, W, 3]`` (EXIF orientation applied)."""
    path = require_file(path, "image file")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Image.DecompressionBombError as exc:
        raise UserError(f"image {path} is too large to read ({describe(exc)}); scale it down") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {describe(exc)}; use a PNG or JPEG file") from exc


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def frame_files(folder: str | Path) -> list[Path]:
    """The image files of a frame folder (``IMAGE_SUFFIXES``), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_frame_folder(folder: str | Path, max_frames: int | None = None, what: str = "frames") -> np.ndarray:
    """A folder of images (sorted by name) as uint8 RGB ``[N, H, W, 3]``; the one frame-folder reader.

    A missing folder, one without images, or images of different sizes is one UserError naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder not found: {folder}")
    files = frame_files(folder)[:max_frames]
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the {what} folder {folder}")
    frames = [read_image(p) for p in files]
    if len({f.shape for f in frames}) > 1:
        raise UserError(f"the images in the {what} folder {folder} do not all have the same size")
    return np.stack(frames)


def write_frame(path: str | Path, frame: np.ndarray, quality: int = 95) -> None:
    """One uint8 frame ``[H, W, 3]`` (RGB) or ``[H, W]`` (gray) as PNG/JPEG, by ``path``'s suffix."""
    Image.fromarray(np.ascontiguousarray(frame)).save(path, quality=quality)


def write_frame_folder(
    folder: str | Path,
    frames: np.ndarray,
    ext: str = ".png",
    *,
    channels_first: bool = False,
    quality: int = 95,
    workers: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write uint8 frames as ``folder/00000.png, 00001.png, ...``; the one frame-folder writer.

    ``frames`` is ``[T, H, W, 3]`` or ``[T, H, W]`` (``[T, 3, H, W]`` with ``channels_first``). The
    files go to a temp folder beside ``folder`` that is renamed into place when all are written, so
    an interrupted run leaves no half-written folder. An existing ``folder`` is replaced only with
    ``overwrite``. ``workers`` > 1 encodes in threads (PIL releases the GIL while encoding).
    """
    from concurrent.futures import ThreadPoolExecutor

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise UserError(f"{folder} already exists; pass --overwrite to replace it")
    frames = np.asarray(frames)
    if channels_first:
        frames = frames.transpose(0, 2, 3, 1)
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        paths = [tmp / f"{i:05d}{ext}" for i in range(len(frames))]
        with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
            for f in [pool.submit(write_frame, p, a, quality) for p, a in zip(paths, frames)]:
                f.result()
        tmp.chmod(0o777 & ~current_umask())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _as_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("no frames to write")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes: replicate the last row/column
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def _as_audio(audio: np.ndarray) -> np.ndarray:
    """float32 ``[C, N]`` in [-1, 1] from ``[N]``, ``[N, C]`` or ``[C, N]`` (C <= 2), or int16."""
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 1:
        audio = audio[None]
    elif audio.ndim == 2 and audio.shape[1] <= 2 < audio.shape[0]:
        audio = audio.T
    if audio.ndim != 2 or audio.shape[0] not in (1, 2):
        raise ValueError(f"audio must be [N], [N, C] or [C, N] with C in (1, 2), got {audio.shape}")
    if audio.size and (audio.min() < -1.0 or audio.max() > 1.0):  # (no copy of a long track in range)
        audio = np.clip(audio, -1.0, 1.0)
    return np.ascontiguousarray(audio)


class VideoWriter:
    """An H.264 (yuv420p) file with optional AAC audio, written batch by batch: the streaming form of
    :func:`write_video` (which is this class given all frames at once).

    The frames go to the encoder as they are added (:meth:`write`), so a video of any length needs
    memory for one batch only; ``audio`` (float in [-1, 1] or int16, mono or stereo, at
    ``sample_rate``) is muxed in full, interleaved with the frames. ``n_frames`` (the number of frames
    that will be written, if known) lets the last frame carry the rest of the audio, as
    :func:`write_video` does; otherwise it follows at :meth:`close`. The file is written under a temp
    name (in ``tmp_dir``, default ``path``'s folder; another file system is copied over) and appears
    at ``path`` only when :meth:`close` completes; :meth:`abort` (or an exception inside a ``with``
    block) removes it.
    """

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: float = FPS,
        audio: np.ndarray | None = None,
        sample_rate: int = SAMPLE_RATE,
        *,
        n_frames: int | None = None,
        metadata: dict[str, str] | None = None,
        crf: int = 18,
        preset: str = "medium",
        tmp_dir: str | Path | None = None,
    ) -> None:
        self.path = Path(path)
        _check_fps(fps)
        self.fps, self.sample_rate, self.n_frames = fps, int(sample_rate), n_frames
        self.audio = _as_audio(audio) if audio is not None else None
        self.size = (int(height), int(width))
        self.frames_written, self._a_pos = 0, 0
        folder = Path(tmp_dir) if tmp_dir is not None else self.path.parent
        for d in {folder, self.path.parent}:
            d.mkdir(parents=True, exist_ok=True)
        suffix = self.path.suffix
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=suffix, dir=folder)
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a normal write follows the umask
        os.close(fd)
        self.tmp: Path | None = Path(tmp)
        options = {"movflags": "+faststart"} if suffix.lower() in (".mp4", ".mov", ".m4v") else {}
        try:
            self.container = av.open(str(self.tmp), mode="w", options=options)
            for key, value in (metadata or {}).items():
                self.container.metadata[str(key)] = str(value)
            self.vstream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            h, w = self.size
            self.vstream.width, self.vstream.height = w + w % 2, h + h % 2
            self.vstream.pix_fmt = "yuv420p"
            self.vstream.options = {"crf": str(crf), "preset": preset}
            self.astream = None
            if self.audio is not None:
                layout = "mono" if self.audio.shape[0] == 1 else "stereo"
                self.astream = self.container.add_stream("aac", rate=self.sample_rate, layout=layout)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: np.ndarray) -> None:
        """Add uint8 ``[n, H, W, 3]`` frames (the size given to the constructor)."""
        if self.tmp is None:
            raise ValueError(f"{self.path}: the writer is closed")
        frames = _as_frames(frames)
        if frames.shape[1:3] != (self.vstream.height, self.vstream.width):
            raise ValueError(f"frames must be {self.size}, got {frames.shape[1:3]}")
        n_audio = self.audio.shape[1] if self.audio is not None else 0
        with disk_full_as(self.path, lambda: bytes_in(self.tmp), self.abort):
            for frame in frames:
                k = self.frames_written
                vframe = av.VideoFrame.from_ndarray(frame, format="rgb24")
                vframe.pts = k
                self.container.mux(self.vstream.encode(vframe))
                self.frames_written += 1
                if self.astream is not None:  # interleave: audio up to the end of this video frame
                    last = self.n_frames is not None and k == self.n_frames - 1
                    a_end = (
                        n_audio if last else min(n_audio, int(round((k + 1) * self.sample_rate / self.fps)))
                    )
                    self._a_pos = _mux_audio(
                        self.container, self.astream, self.audio, self._a_pos, a_end, self.sample_rate
                    )

    def close(self) -> Path:
        """Flush the encoders, mux the rest of the audio, close the file and move it to ``path``."""
        if self.tmp is None:
            raise ValueError(f"{self.path}: the writer is closed")
        if self.frames_written == 0:
            self.abort()
            raise ValueError("no frames to write")
        try:
            with disk_full_as(self.path, lambda: bytes_in(self.tmp), self.abort):
                self.container.mux(self.vstream.encode(None))
                if self.astream is not None:
                    n_audio = self.audio.shape[1]
                    _mux_audio(
                        self.container, self.astream, self.audio, self._a_pos, n_audio, self.sample_rate
                    )
                    self.container.mux(self.astream.encode(None))
                self.container.close()
                try:
                    os.replace(self.tmp, self.path)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    with atomic_path(self.path) as copy:  # tmp_dir on another file system
                        shutil.copyfile(self.tmp, copy)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Close the file and remove it (nothing appears at ``path``); a no-op once closed."""
        tmp, self.tmp = self.tmp, None
        if tmp is None:
            return
        container = getattr(self, "container", None)
        try:
            if container is not None:
                container.close()
        except (av.FFmpegError, OSError, ValueError):
            pass  # a half-written file that is deleted next
        finally:
            tmp.unlink(missing_ok=True)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = FPS,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
    *,
    metadata: dict[str, str] | None = None,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Write uint8 ``[T, H, W, 3]`` frames as H.264 (yuv420p) with optional AAC audio, atomically.

    ``audio`` (float in [-1, 1] or int16, mono or stereo, at ``sample_rate``) is muxed in full;
    the caller makes video and audio the same length. ``metadata`` goes into the container
    tags (e.g. ``comment``). The file appears at ``path`` only once it is complete.
    :class:`VideoWriter` writes the same file batch by batch.
    """
    _check_fps(fps)
    frames = _as_frames(frames)
    if audio is not None:
        _as_audio(audio)  # bad audio fails before any file is made
    n, h, w = frames.shape[:3]
    kw = dict(n_frames=n, metadata=metadata, crf=crf, preset=preset)
    with VideoWriter(path, w, h, fps, audio, sample_rate, **kw) as writer:
        writer.write(frames)
    return Path(path)


def _mux_audio(container, stream, audio: np.ndarray, start: int, end: int, sample_rate: int) -> int:
    if end <= start:
        return start
    chunk = np.ascontiguousarray(audio[:, start:end])
    aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
    aframe.sample_rate = int(sample_rate)
    aframe.pts = start
    aframe.time_base = Fraction(1, int(sample_rate))
    container.mux(stream.encode(aframe))
    return end


def probe(path: str | Path) -> dict[str, Any]:
    """Describe a media file: duration, container tags, and the first video and audio stream.

    Returns ``{"duration": s, "metadata": {...}, "video": {"fps", "width", "height", "frames",
    "codec", "duration"} | None, "audio": {"sample_rate", "channels", "codec", "duration"} | None}``.
    ``frames`` is counted from the packets when the container does not record it.
    """
    container = _open(path, what="media")
    try:
        info: dict[str, Any] = {
            "duration": container.duration / 1e6 if container.duration else None,
            "metadata": dict(container.metadata),
            "video": None,
            "audio": None,
        }
        if container.streams.video:
            vs = container.streams.video[0]
            frames = int(vs.frames or 0)
            if frames == 0:
                frames = sum(1 for p in container.demux(vs) if p.size > 0)
            info["video"] = {
                "fps": float(vs.average_rate) if vs.average_rate else None,
                "width": vs.codec_context.width,
                "height": vs.codec_context.height,
                "frames": frames,
                "codec": vs.codec_context.name,
                "duration": float(vs.duration * vs.time_base) if vs.duration else None,
            }
        if container.streams.audio:
            aus = container.streams.audio[0]
            info["audio"] = {
                "sample_rate": aus.codec_context.sample_rate,
                "channels": aus.codec_context.channels,
                "codec": aus.codec_context.name,
                "duration": float(aus.duration * aus.time_base) if aus.duration else None,
            }
        return info
    finally:
        container.close()
