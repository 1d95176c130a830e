"""HDTF from its own metadata: download each video once (yt-dlp) and cut its annotated talking-head
intervals into 25 fps clips with their audio (PyAV), in the form ``scripts/preprocess_hdtf.sh`` reads.

    scripts/download_hdtf.sh --metadata HDTF/HDTF_dataset --out data/HDTF/videos [--subsets RD,WDA,WRA]
        [--jobs 4] [--keep_raw] [--size 512] [--crop metadata|none] [--no_space_check]

``--metadata`` is the ``HDTF_dataset`` folder of github.com/MRzzm/HDTF (CC BY 4.0). Per subset it reads

* ``{subset}_video_url.txt``: ``name url`` (the video host URL; yt-dlp takes any URL it knows, a direct
  file URL included),
* ``{subset}_annotion_time.txt``: ``name.mp4 MM:SS-MM:SS MM:SS-MM:SS ...`` (the talking-head intervals),
* ``{subset}_crop_wh.txt``: ``name_k.mp4 x width y height`` (the face window of interval k, in pixels of
  the video at the resolution of ``{subset}_resolution.txt``),
* ``{subset}_resolution.txt``: ``name.mp4 height`` (the resolution the authors downloaded; 0: unknown).

Each video is downloaded once (the metadata's resolution, else the best up to 1080p; video and audio
as separate streams when the host offers them, so no ffmpeg is needed) into ``OUT/.raw/`` and every
interval ``k`` becomes ``OUT/{subset}_{name}_{k:03d}.mp4`` (the clip ids of the MoDiTalker test split,
e.g. ``RD_Radio34_003``): 25 fps (each output frame shows the latest source frame at or before its time,
exact to a frame: an interval of S seconds has 25 * S frames), H.264 + AAC audio cut to the same
interval, the face window of ``crop_wh`` (scaled from the metadata's resolution to the downloaded one)
cropped and resized to ``--size`` (512 by default, as HDTF's authors did; ``scripts/preprocess_hdtf.sh``
then centre-crops this square and resizes it to 256). ``--crop none`` keeps the whole frame (the
preprocessing's centre crop then decides what is kept).

Resumable: finished clips are kept and a re-run downloads and cuts only the missing ones; clips are
written under a temp name and renamed when complete, so an interrupted cut leaves nothing at the clip's
path (its stale temp file is removed on the next run); yt-dlp resumes its partial downloads. The raw
download of a video is deleted once all its clips are made (``--keep_raw`` keeps it). At the end a
report: clips made, clips already there, videos that could not be downloaded or cut (named, with the
reason), also written to ``OUT/download_report.json``; exit status 2 when any video failed, after all
others were done.

Before it starts, it says the space the run needs in ``OUT`` (an estimate per clip and per raw download,
:mod:`data.hdtf_folder`) and the space free, and stops with exit status 2 when that is short
(``--no_space_check`` starts anyway). Only a finished raw download is used (never yt-dlp's ``.part``
or ``.part-FragN`` files), and one that cannot be read when its clips are cut is deleted, so the next
run downloads it again.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.hdtf_folder import check_settings, check_space, finished_download
from moditalker.constants import FPS
from moditalker.errors import ArgumentParser, UserError, cli_main, describe
from moditalker.fileio import atomic_write_text

SUBSETS = ("RD", "WDA", "WRA")
RAW_DIR = ".raw"
REPORT = "download_report.json"
MAX_HEIGHT = 1080
REMOVED = "; the download is removed, the next run fetches it again"


@dataclass
class Clip:
    id: str  # {subset}_{name}_{k:03d}
    start: float  # seconds
    end: float
    crop: tuple[int, int, int, int] | None  # x, w, y, h at the metadata's resolution


@dataclass
class Video:
    subset: str
    name: str
    url: str
    resolution: int  # 0: unknown
    clips: list[Clip] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.subset}_{self.name}"


# ----------------------------------------------------------------------------- metadata


def _parse_time(text: str, where: str) -> float:
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values):
        raise UserError(f"{where}: bad time {text!r} (expected MM:SS)")
    seconds = 0.0
    for v in values:
        seconds = seconds * 60 + v
    return seconds


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise UserError(f"HDTF metadata file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        words = line.split()
        if words:
            out.append((n, words))
    return out


def _stem(name: str) -> str:
    return name[:-4] if name.lower().endswith(".mp4") else name


def read_metadata(folder: str | Path, subsets: Sequence[str] = SUBSETS) -> tuple[list[Video], list[str]]:
    """The videos of ``subsets`` with their clips, and notes on annotated videos without a URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--metadata {folder} is not a folder (the HDTF_dataset folder of MRzzm/HDTF)")
    videos: list[Video] = []
    notes: list[str] = []
    for subset in subsets:
        urls = {}
        for n, words in _rows(folder / f"{subset}_video_url.txt"):
            if len(words) < 2:
                raise UserError(f"{folder / f'{subset}_video_url.txt'}:{n}: expected 'name url'")
            urls[_stem(words[0])] = words[1]
        res_file = folder / f"{subset}_resolution.txt"
        resolution = {}
        if res_file.is_file():
            for _, words in _rows(res_file):
                try:
                    resolution[_stem(words[0])] = int(float(words[1])) if len(words) > 1 else 0
                except ValueError:
                    resolution[_stem(words[0])] = 0
        crop_file = folder / f"{subset}_crop_wh.txt"
        crops: dict[str, tuple[int, int, int, int]] = {}
        if crop_file.is_file():
            for n, words in _rows(crop_file):
                try:
                    crops[_stem(words[0])] = tuple(int(float(w)) for w in words[1:5])  # type: ignore
                except ValueError as exc:
                    raise UserError(f"{crop_file}:{n}: expected 'name_k.mp4 x width y height'") from exc
        time_file = folder / f"{subset}_annotion_time.txt"
        for n, words in _rows(time_file):
            name = _stem(words[0])
            if name not in urls:
                notes.append(f"{subset}_{name}: annotated but has no URL in {subset}_video_url.txt")
                continue
            video = Video(subset, name, urls[name], resolution.get(name, 0))
            for k, span in enumerate(words[1:]):
                if "-" not in span:
                    raise UserError(f"{time_file}:{n}: bad interval {span!r} (expected MM:SS-MM:SS)")
                a, b = span.split("-", 1)
                start, end = _parse_time(a, f"{time_file}:{n}"), _parse_time(b, f"{time_file}:{n}")
                if end <= start:
                    raise UserError(f"{time_file}:{n}: interval {span!r} ends before it starts")
                video.clips.append(Clip(f"{subset}_{name}_{k:03d}", start, end, crops.get(f"{name}_{k}")))
            videos.append(video)
    return videos, notes


# ----------------------------------------------------------------------------- download (yt-dlp)


class _Quiet:
    """yt-dlp logger: keeps the last error line, prints nothing (the report names failures)."""

    def __init__(self) -> None:
        self.last = ""

    def debug(self, msg: str) -> None:
        pass

    info = warning = debug

    def error(self, msg: str) -> None:
        self.last = re.sub(r"^(\x1b\[[0-9;]*m)?ERROR:(\x1b\[0m)?\s*", "", str(msg)).strip()


def _ydl_download(url: str, out_stem: Path, fmt: str) -> Path:
    """Download ``url`` in format ``fmt`` to ``out_stem.<ext>`` (resuming a partial file); the path."""
    import yt_dlp

    done = finished_download(out_stem)  # never a partial file (.part, .part-FragN, .ytdl)
    if done is not None:
        return done
    log = _Quiet()
    opts = {
        "format": fmt,
        "outtmpl": str(out_stem) + ".%(ext)s",
        "continuedl": True,
        "noplaylist": True,
        "quiet": True,
        "noprogress": True,
        "retries": 3,
        "logger": log,
        "overwrites": False,
        "cachedir": False,
        "paths": {"home": str(out_stem.parent), "temp": str(out_stem.parent)},
    }
    try:
        with yt_dlp.YoutubeDL(opts) as ydl:
            info = ydl.extract_info(url, download=True)
            path = Path(ydl.prepare_filename(info))
    except Exception as exc:  # noqa: BLE001 - yt-dlp's DownloadError and anything under it
        raise UserError(log.last or describe(exc)) from exc
    if not path.is_file():
        raise UserError(f"yt-dlp reported success but wrote no file for {url}")
    return path


def _has_audio(path: Path) -> bool:
    import av

    try:
        with av.open(str(path)) as c:
            return bool(c.streams.audio)
    except av.error.FFmpegError as exc:  # a damaged download
        path.unlink(missing_ok=True)
        raise UserError(f"cannot read {path.name}: {describe(exc)}{REMOVED}") from exc


def download_video(video: Video, raw_dir: Path) -> tuple[Path, Path | None]:
    """``(video file, audio file or None)`` of ``video`` in ``raw_dir``: the metadata's resolution, else
    the best up to 1080p; a separate audio stream when the video file has none."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    h = video.resolution if 0 < video.resolution <= MAX_HEIGHT else MAX_HEIGHT
    vfmt = f"bestvideo[height<={h}][ext=mp4]/bestvideo[height<={h}]/best[height<={h}]/best"
    vpath = _ydl_download(video.url, raw_dir / f"{video.key}.video", vfmt)
    if _has_audio(vpath):
        return vpath, None
    apath = _ydl_download(video.url, raw_dir / f"{video.key}.audio", "bestaudio[ext=m4a]/bestaudio/best")
    if not _has_audio(apath):
        raise UserError(f"no audio stream found for {video.url}")
    return vpath, apath


# ----------------------------------------------------------------------------- cutting (PyAV)


def _read_audio(path: Path) -> tuple[np.ndarray, int, float]:
    """``(samples float32 [C, N], rate, start time in seconds)`` of the first audio stream."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")
        parts, rate, start = [], None, None
        for frame in c.decode(stream):
            if start is None and frame.pts is not None and frame.time_base is not None:
                start = float(frame.pts * frame.time_base)
            for out in resampler.resample(frame):
                rate = out.sample_rate
                parts.append(out.to_ndarray().reshape(len(out.layout.channels), -1))
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(len(out.layout.channels), -1))
    if not parts:
        raise UserError(f"{path}: the audio stream holds no samples")
    channels = min(max(p.shape[0] for p in parts), 2)
    parts = [p[:channels] if p.shape[0] >= channels else np.repeat(p[:1], channels, 0) for p in parts]
    return np.concatenate(parts, axis=1).astype(np.float32), int(rate), start or 0.0


def _video_start(path: Path) -> tuple[float, int]:
    """``(time of the first video frame, height)``."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        height = stream.codec_context.height
        for frame in c.decode(stream):
            if frame.pts is not None and stream.time_base is not None:
                return float(frame.pts * stream.time_base), height
            return 0.0, height
    return 0.0, height


def _window(clip: Clip, video: Video, shape: tuple[int, int], mode: str) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the crop in the downloaded frames (``shape`` = (height, width))."""
    height, width = shape
    if mode == "none" or clip.crop is None:
        return 0, height, 0, width
    x, w, y, h = clip.crop
    scale = height / video.resolution if video.resolution > 0 else 1.0
    x0, y0 = max(int(round(x * scale)), 0), max(int(round(y * scale)), 0)
    x1, y1 = min(int(round((x + w) * scale)), width), min(int(round((y + h) * scale)), height)
    if x1 - x0 < 8 or y1 - y0 < 8:
        return 0, height, 0, width
    return y0, y1, x0, x1


def cut_clips(
    video: Video,
    clips: list[Clip],
    vpath: Path,
    apath: Path | None,
    out: Path,
    size: int = 512,
    crop: str = "metadata",
) -> list[str]:
    """Cut ``clips`` of ``video`` (one decoding pass of ``vpath``) into ``out/{id}.mp4``; their ids."""
    import cv2

    from data.video import VideoWriter, iter_video

    audio, rate, a_start = _read_audio(apath or vpath)
    v_start, _ = _video_start(vpath)
    todo = sorted(clips, key=lambda c: c.start)
    made: list[str] = []
    writer, current, window, end_slot = None, None, None, 0
    try:
        for slot, frame in enumerate(iter_video(vpath, fps=FPS)):
            if writer is not None and slot >= end_slot:
                writer.close()
                made.append(current.id)
                writer = None
            if writer is None:
                while todo and int(round(todo[0].end * FPS)) <= slot:  # its interval is already past
                    todo.pop(0)
                if not todo:
                    break
                if slot < int(round(todo[0].start * FPS)):
                    continue
                current = todo.pop(0)
                first, end_slot = int(round(current.start * FPS)), int(round(current.end * FPS))
                window = _window(current, video, frame.shape[:2], crop)
                # audio of the same interval, on the video's clock (the first frame is time 0)
                a0 = int(round((first / FPS + v_start - a_start) * rate))
                a1 = a0 + int(round((end_slot - first) * rate / FPS))
                seg = audio[:, max(a0, 0) : max(a1, 0)]
                if a0 < 0:
                    seg = np.concatenate([np.zeros((audio.shape[0], -a0), np.float32), seg], axis=1)
                if seg.shape[1] < a1 - a0:
                    seg = np.pad(seg, ((0, 0), (0, a1 - a0 - seg.shape[1])))
                y0, y1, x0, x1 = window
                side = (size, size) if size > 0 else ((x1 - x0) // 2 * 2, (y1 - y0) // 2 * 2)
                writer = VideoWriter(
                    out / f"{current.id}.mp4", side[0], side[1], FPS, seg, rate, n_frames=end_slot - first
                )
            y0, y1, x0, x1 = window
            image = frame[y0:y1, x0:x1]
            w, h = writer.size[1], writer.size[0]
            if image.shape[:2] != (h, w):
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            writer.write(image[None])
        if writer is not None:
            if writer.frames_written == end_slot - int(round(current.start * FPS)):
                writer.close()
                made.append(current.id)
            else:
                writer.abort()
                raise UserError(
                    f"{current.id}: the video ends at {writer.frames_written} of its "
                    f"{end_slot - int(round(current.start * FPS))} frames"
                )
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    missing = [c.id for c in todo if c.id not in made]
    if missing:
        raise UserError(f"the video ends before the intervals of {', '.join(missing)}")
    return made


# ----------------------------------------------------------------------------- the whole run


def _remove_stale_temps(out: Path, clip_id: str) -> None:
    for p in out.glob(f".{clip_id}.mp4.*"):
        p.unlink(missing_ok=True)


def process_video(
    video: Video, out: Path, size: int, crop: str, keep_raw: bool
) -> tuple[list[str], list[str]]:
    """Download ``video`` and cut its missing clips; ``(made, already there)``."""
    have = [c.id for c in video.clips if (out / f"{c.id}.mp4").is_file()]
    todo = [c for c in video.clips if c.id not in have]
    if not todo:
        return [], have
    for c in todo:
        _remove_stale_temps(out, c.id)
    raw = out / RAW_DIR
    vpath, apath = download_video(video, raw)
    raws = [p for p in (vpath, apath) if p is not None]
    try:
        made = cut_clips(video, todo, vpath, apath, out, size, crop)
    except Exception as exc:  # noqa: BLE001 - a damaged download: PyAV errors of any kind
        import av

        damaged = isinstance(exc, av.error.FFmpegError)  # the download cannot be read: fetch it again
        for p in raws if damaged else ():  # (a failed write keeps it for the next run)
            p.unlink(missing_ok=True)
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot cut {vpath.name}: {describe(exc)}{REMOVED if damaged else ''}") from exc
    for p in raws if not keep_raw else ():
        p.unlink(missing_ok=True)
    return made, have


def run(
    metadata: str | Path,
    out: str | Path,
    subsets: Sequence[str] = SUBSETS,
    jobs: int = 4,
    keep_raw: bool = False,
    size: int = 512,
    crop: str = "metadata",
    progress: bool = True,
    space_check: bool = True,
) -> dict:
    """Download and cut every clip of ``subsets``; the report (also in ``out/download_report.json``).
    ``space_check``: first say the space needed (:func:`data.hdtf_folder.check_space`), refuse if short."""
    from tqdm import tqdm

    videos, notes = read_metadata(metadata, subsets)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, {"size": size, "crop": crop})
    if space_check:
        print(check_space(videos, out, size, jobs, keep_raw), flush=True)
    report = {"clips_made": [], "clips_present": [], "failed": {}, "notes": notes}
    lock = threading.Lock()
    bar = tqdm(total=len(videos), unit="video", disable=not progress, desc="HDTF")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(process_video, v, out, size, crop, keep_raw): v for v in videos}
        for fut in as_completed(futures):
            video = futures[fut]
            try:
                made, have = fut.result()
            except UserError as exc:
                with lock:
                    report["failed"][video.key] = f"{video.url}: {exc}"
            else:
                with lock:
                    report["clips_made"] += made
                    report["clips_present"] += have
            bar.update(1)
            bar.set_postfix(made=len(report["clips_made"]), failed=len(report["failed"]))
    bar.close()
    try:
        (out / RAW_DIR).rmdir()  # when empty: every video done (or none downloaded)
    except OSError:
        pass
    for key in ("clips_made", "clips_present"):
        report[key].sort()
    atomic_write_text(out / REPORT, json.dumps(report, indent=1) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="scripts/download_hdtf.sh",
        description="Download HDTF's videos from its metadata (yt-dlp) and cut the annotated intervals into "
        "25 fps clips with audio (OUT/{subset}_{name}_{k:03d}.mp4). Resumable; exit 2 when a video failed.",
    )
    ap.add_argument("--metadata", required=True, help="the HDTF_dataset folder of github.com/MRzzm/HDTF")
    ap.add_argument("--out", required=True, help="folder for the clips (raw downloads go to OUT/.raw)")
    ap.add_argument("--subsets", default=",".join(SUBSETS), help="comma-separated subset names (RD,WDA,WRA)")
    ap.add_argument("--jobs", type=int, default=4, help="videos downloaded and cut in parallel")
    ap.add_argument("--keep_raw", action="store_true", help="keep the raw downloads in OUT/.raw")
    ap.add_argument(
        "--size", type=int, default=512, help="side of the square output clips (0: the crop's own size)"
    )
    ap.add_argument(
        "--crop",
        choices=("metadata", "none"),
        default="metadata",
        help="metadata: the face window of {subset}_crop_wh.txt; none: the whole frame",
    )
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--no_space_check", action="store_true", help="start even if the free space looks short")
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    if not subsets:
        raise UserError("--subsets names no subset")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.size < 0 or (0 < args.size < 16) or args.size % 2:
        raise UserError(f"--size must be 0 (the crop's own size) or an even number >= 16, got {args.size}")
    report = run(args.metadata, args.out, subsets, args.jobs, args.keep_raw, args.size, args.crop,
                 not args.no_progress, not args.no_space_check)  # fmt: skip
    print(
        f"clips made: {len(report['clips_made'])}; already there: {len(report['clips_present'])}; "
        f"videos failed: {len(report['failed'])}; report: {Path(args.out) / REPORT}"
    )
    for note in report["notes"]:
        print(f"  note: {note}")
    for key, why in sorted(report["failed"].items()):
        print(f"  unavailable: {key}: {why}")
    if report["failed"]:
        names = ", ".join(sorted(report["failed"]))
        raise UserError(
            f"{len(report['failed'])} video(s) could not be downloaded or cut ({names}); "
            "the other clips are done; run the command again to retry them"
        )
    return report


if __name__ == "__main__":
    cli_main(main)
