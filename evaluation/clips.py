"""The inputs and the real side of a generating protocol (:mod:`evaluation.protocols`).

For each job (an audio source and a reference source, the same video for self-reconstruction) the
clip length is fixed first: ``n`` frames at 25 fps, the shorter of the reference video, the audio
(whole 640-sample frames at 16 kHz) and ``--seconds``. Then

* the driving audio: the first ``n * 640`` samples of the audio source, 16 kHz mono, as a wav (the
  pipeline's ``--audio``; it makes exactly ``n`` frames from it);
* the real clip: the first ``n`` frames of the reference video, decoded at 25 fps and centre-cropped
  and resized to 256x256 by :func:`data.imageops.resize_crop` (what the pipeline's ``reference``
  stage does to the same video, so frame ``k`` of the real clip is the pipeline's reference frame
  ``k``), H.264 at CRF :data:`REAL_CRF` with the reference video's own audio (16 kHz AAC).

Frames are streamed in chunks: no video is held in memory whole.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from evaluation.protocol import SIZE, count_frames, iter_frames
from moditalker.constants import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from moditalker.errors import UserError
from moditalker.fileio import atomic_path

__all__ = [
    "REAL_CRF",
    "find_videos",
    "check_audio",
    "load_wave",
    "clip_length",
    "fit_audio",
    "write_real_clip",
]

#: H.264 quality of the real clips (visually lossless; the generated videos use the pipeline's CRF 18)
REAL_CRF = 10


def find_videos(data: str | Path) -> dict[str, Path]:
    """``{id: video}`` of ``data``: ``{id}.mp4`` (or .mov, .mkv, ...) files, or ``{id}/`` folders
    holding one video (HDTF's per-clip folders); folders of frames are left out (they have no audio)."""
    from data.builders import find_sources

    data = Path(data)
    if not data.is_dir():
        raise UserError(f"--data {data} is not a folder; pass the folder of test videos ({{id}}.mp4)")
    videos = {k: p for k, p in find_sources(data).items() if p.is_file()}
    if not videos:
        raise UserError(f"no videos in --data {data}; it must hold {{id}}.mp4 files with their audio")
    return videos


def check_audio(path: Path) -> None:
    """A UserError unless ``path`` has an audio track (read from the headers only)."""
    from data.video import probe

    if probe(path)["audio"] is None:
        raise UserError(f"{path} has no audio track; the protocol drives each video with its own audio")


def load_wave(path: Path) -> np.ndarray:
    """The audio track of ``path`` as 16 kHz mono float32 (a video without one is a UserError)."""
    from data.audio import load_audio

    check_audio(path)
    return load_audio(path, SAMPLE_RATE)


def clip_length(ref_video: Path, audio: np.ndarray, seconds: float | None) -> int:
    """Frames of the clip: the reference video's frames at 25 fps, the audio's whole frames and
    ``seconds`` (when given), whichever is fewest."""
    n = min(count_frames(ref_video, FPS), len(audio) // SAMPLES_PER_FRAME)
    if seconds is not None:
        n = min(n, int(math.floor(seconds * FPS + 1e-6)))
    return n


def fit_audio(wave: np.ndarray, n_frames: int) -> np.ndarray:
    """``wave`` cut (or zero-padded) to exactly ``n_frames`` video frames of samples."""
    n = n_frames * SAMPLES_PER_FRAME
    return wave[:n] if len(wave) >= n else np.pad(wave, (0, n - len(wave)))


def write_real_clip(
    path: Path, video: Path, n_frames: int, audio: np.ndarray, size: int = SIZE, chunk: int = 32
) -> Path:
    """The first ``n_frames`` of ``video`` (25 fps, centre crop, ``size``) with ``audio`` (16 kHz,
    cut to the clip) as H.264 + AAC, written atomically and streamed chunk by chunk."""
    from data.imageops import resize_crop

    audio = np.clip(fit_audio(np.asarray(audio, np.float32), n_frames), -1.0, 1.0)[None]
    with atomic_path(path) as tmp:
        container = av.open(str(tmp), mode="w", options={"movflags": "+faststart"})
        try:
            vs = container.add_stream("libx264", rate=Fraction(FPS))
            vs.width = vs.height = size
            vs.pix_fmt = "yuv420p"
            vs.options = {"crf": str(REAL_CRF), "preset": "medium"}
            aus = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            written = a_pos = 0
            for frames in iter_frames(video, FPS, chunk):
                frames = resize_crop(frames[: n_frames - written], size)
                for image in frames:
                    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                    vf.pts = written
                    container.mux(vs.encode(vf))
                    written += 1
                a_pos = _mux_audio(container, aus, audio, a_pos, written * SAMPLES_PER_FRAME)
                if written >= n_frames:
                    break
            if written < n_frames:
                raise UserError(f"{video}: {written} frames decoded, {n_frames} expected; is it damaged?")
            container.mux(vs.encode(None))
            _mux_audio(container, aus, audio, a_pos, audio.shape[1])
            container.mux(aus.encode(None))
        finally:
            container.close()
    return path


def _mux_audio(container, stream, audio: np.ndarray, start: int, end: int) -> int:
    if end <= start:
        return start
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(audio[:, start:end]), format="fltp", layout="mono"
    )
    frame.sample_rate = SAMPLE_RATE
    frame.pts = start
    frame.time_base = Fraction(1, SAMPLE_RATE)
    container.mux(stream.encode(frame))
    return end
