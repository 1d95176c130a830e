"""What the HDTF download (:mod:`data.hdtf_download`) checks in its ``--out`` folder.

* :func:`check_settings`: the clips of one folder are made with one ``--size`` and ``--crop``.
* :func:`space_needed` estimates, before anything is downloaded, the bytes a run needs in ``--out``:
  each clip still to make at its size, plus the raw downloads that exist at one time (``--jobs`` videos
  when they are deleted after their clips, all of them with ``--keep_raw``). The per-second rates are
  typical of the video host's H.264 streams and of the clips' H.264 (crf 18) + AAC; a video's length is
  taken as the end of its last interval (the whole video is downloaded, so it may be longer).
  :func:`check_space` compares it with the free space and refuses to start when it is short.
* :func:`finished_download` tells a finished raw download (``KEY.video.mp4``) from what yt-dlp leaves
  while it works (``KEY.video.mp4.part``, ``KEY.video.mp4.part-Frag3``, ``.ytdl``, ``.temp``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moditalker.errors import UserError
from moditalker.fileio import atomic_write_text

MB = 1024 * 1024
#: bytes per second of a raw download by its height (H.264 video up to that height), and of its audio
RAW_RATES = ((360, 0.09 * MB), (480, 0.15 * MB), (720, 0.35 * MB), (1080, 0.65 * MB))
AUDIO_RATE = 0.02 * MB
#: bytes per second of a 512x512 clip (H.264 crf 18, AAC); other sizes scale with the area
CLIP_RATE_512 = 0.35 * MB
MARGIN = 1.2
#: what a finished raw download may be called (``KEY.video.<ext>``, ``KEY.audio.<ext>``)
MEDIA_SUFFIXES = (".mp4", ".m4a", ".webm", ".mkv", ".mov", ".flv", ".3gp", ".opus", ".ogg", ".mp3", ".aac")


SETTINGS = "download_settings.json"


def check_settings(out: Path, settings: dict) -> None:
    """The clips of one folder are made with one size and crop: the first run records them in
    ``OUT/download_settings.json``, a later run with others is refused (a clip already there would not
    be made again)."""
    path = out / SETTINGS
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        if saved != settings:
            raise UserError(
                f"{out} holds clips made with {saved} ({path}); this run asks for {settings}: give another "
                "--out, or the same --size and --crop"
            )
    else:
        atomic_write_text(path, json.dumps(settings) + "\n")


def finished_download(out_stem: Path) -> Path | None:
    """The finished download ``out_stem.<media suffix>`` if there is one (never a partial file)."""
    for suffix in MEDIA_SUFFIXES:
        path = out_stem.with_name(out_stem.name + suffix)
        if path.is_file():
            return path
    return None


def _raw_rate(height: int, max_height: int) -> float:
    h = height if 0 < height <= max_height else max_height
    return next((rate for top, rate in RAW_RATES if h <= top), RAW_RATES[-1][1]) + AUDIO_RATE


def space_needed(
    videos: Sequence[Any], out: Path, size: int, jobs: int, keep_raw: bool, max_height: int = 1080
) -> tuple[int, int]:
    """``(bytes needed, clips to make)`` for the clips of ``videos`` not yet in ``out``."""
    clip_rate = CLIP_RATE_512 * ((size or 512) / 512) ** 2
    clips_bytes, raws, n = 0.0, [], 0
    for video in videos:
        todo = [c for c in video.clips if not (out / f"{c.id}.mp4").is_file()]
        if not todo:
            continue
        n += len(todo)
        clips_bytes += sum((c.end - c.start) * clip_rate for c in todo)
        raws.append(max(c.end for c in video.clips) * _raw_rate(video.resolution, max_height))
    raws.sort(reverse=True)
    raw_bytes = sum(raws if keep_raw else raws[: max(1, jobs)])
    return int(MARGIN * (clips_bytes + raw_bytes)), n


def check_space(videos: Sequence[Any], out: Path, size: int, jobs: int, keep_raw: bool) -> str:
    """The line saying the space needed and free in ``out``; :class:`UserError` when it is short."""
    need, n = space_needed(videos, out, size, jobs, keep_raw)
    free = shutil.disk_usage(out).free
    what = f"{n} clip(s) to make, raw downloads of {'all videos' if keep_raw else f'up to {jobs} at a time'}"
    if need > free:
        raise UserError(
            f"not enough free space in {out}: about {need / MB:.0f} MB needed ({what}), {free / MB:.0f} MB "
            "free; free some space, or pass --no_space_check to start anyway"
        )
    return f"disk: about {need / MB:.0f} MB needed in {out} ({what}), {free / MB:.0f} MB free"
