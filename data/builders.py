"""The dataset builders behind ``python -m data.preprocess`` (see that module for the file layouts):
finding the sources, sharding and resuming, the keypoints of one video, one HDTF item, one LRS3 clip,
and the per-item loop that skips finished ids and reports failures without stopping the run."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from data.video import IMAGE_SUFFIXES
from moditalker.bulk import Ranks, check_shard
from moditalker.constants import FPS
from moditalker.errors import UserError
from moditalker.fileio import (
    atomic_path,
    atomic_write_text,
    folder_problem,
    npz_problem,
    path_records,
    save_npy,
)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".flv", ".mpg", ".mpeg")
KEYPOINT_DIRS = {
    "unposed": Path("keypoints/face-centric/unposed"),
    "posed": Path("keypoints/face-centric/posed"),
    "nfc": Path("keypoints/non-face-centric/posed"),
    "fa": Path("keypoints/fa"),
}
FORMAT_VERSION = 1


class LandmarkDetector(Protocol):
    def detect(self, frames: np.ndarray, source: str = ...) -> tuple[np.ndarray, int]: ...


class Reconstructor(Protocol):
    lm3d_std: np.ndarray

    def reconstruct(self, frames: np.ndarray, lm68: np.ndarray) -> np.ndarray: ...


@dataclass
class Toolkit:
    """The learned/external components a builder needs, built once per process."""

    detector: LandmarkDetector
    reconstructor: Reconstructor
    face3d: Any  # data.face3d.Face3DHelper
    hubert: Any | None = None  # data.audio.HubertExtractor (LRS3, or HDTF with --hubert)


# ------------------------------------------------------------------------------------------------
# inputs, shards, resume


def find_sources(root: str | Path, recursive: bool = False) -> dict[str, Path]:
    """Map clip id -> source under ``root``: videos (``{id}.mp4`` or ``{id}/video.mp4``) or frame folders.

    With ``recursive`` (LRS3 layout ``{split}/{speaker}/{clip}.mp4``) every video below ``root`` is
    taken and its id is the relative path without suffix (``trainval/abc/50001``).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"input folder not found: {root}")
    out: dict[str, Path] = {}
    if recursive:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
                out[p.relative_to(root).with_suffix("").as_posix()] = p
        return out
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
            out[p.stem] = p
        elif p.is_dir():
            videos = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
            images = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            if len(videos) == 1:
                out[p.name] = videos[0]
            elif images:
                out[p.name] = p  # already extracted frames (assumed to be 25 fps)
    return out


def select_shard(ids: Iterable[str], shard: int = 0, num_shards: int = 1) -> list[str]:
    """Every ``num_shards``-th id of the sorted list, starting at ``shard`` (disjoint, covering): the
    split :meth:`moditalker.bulk.Ranks.share` makes."""
    check_shard(shard, num_shards)
    return Ranks(rank=shard, world=num_shards).share(ids)


def _read_frames(source: Path, fps: float, max_frames: int | None = None) -> np.ndarray:
    from data.video import read_frame_folder, read_video

    if source.is_dir():
        return read_frame_folder(source, max_frames)
    frames, _ = read_video(source, fps=fps, max_frames=max_frames)
    if frames.shape[0] == 0:
        raise UserError(f"{source} has no video frames")
    return frames


# ------------------------------------------------------------------------------------------------
# keypoints


def face_keypoints(toolkit: Toolkit, frames: np.ndarray, source: str = "video") -> dict[str, np.ndarray]:
    """FAN + 3DMM for ``frames [T, H, W, 3]``: fa, coeff, idexp, unposed, posed and non-face-centric."""
    from data.face3d import idexp_to_lm3d
    from data.motion_align import align_landmarks, compute_rotation_matrix, rigid_transform

    frames = np.ascontiguousarray(frames)
    lm68, n_interp = toolkit.detector.detect(frames, source=source)
    lm68 = np.asarray(lm68, dtype=np.float32)
    coeff = np.asarray(toolkit.reconstructor.reconstruct(frames, lm68), dtype=np.float32)
    helper = toolkit.face3d
    with torch.inference_mode():
        idexp = helper.reconstruct_idexp_lm3d(coeff[:, 0:80], coeff[:, 80:144])
        unposed = idexp_to_lm3d(idexp, helper.key_mean_shape)
        posed = rigid_transform(unposed.cpu(), compute_rotation_matrix(coeff[:, 224:227]), coeff[:, 254:257])
    unposed_np = unposed.cpu().numpy().astype(np.float32)
    nfc = align_landmarks(
        unposed_np, lm68, coeff, np.asarray(toolkit.reconstructor.lm3d_std), frames.shape[1:3]
    )
    return {
        "fa": lm68,
        "n_interpolated": int(n_interp),
        "coeff": coeff,
        "idexp_lm3d": idexp.cpu().numpy().astype(np.float32),
        "unposed": unposed_np,
        "posed": posed.numpy().astype(np.float32),
        "nfc": nfc.astype(np.float32),  # integral pixel values, stored as float like the original
    }


# ------------------------------------------------------------------------------------------------
# HDTF


def _write_per_frame(
    pool: ThreadPoolExecutor,
    folder: Path,
    arrays: np.ndarray,
    writer: Callable[[Path, np.ndarray], None],
    ext: str,
) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    return [pool.submit(writer, folder / f"{i:05d}{ext}", a) for i, a in enumerate(arrays)]


def _npy_writer(path: Path, array: np.ndarray) -> None:
    save_npy(path, array)


def _item_dirs(out_dir: Path, item_id: str) -> list[Path]:
    return [out_dir / "frames" / item_id] + [out_dir / d / item_id for d in KEYPOINT_DIRS.values()]


def is_finished(out_dir: str | Path, item_id: str) -> bool:
    """Whether ``item_id`` was completed by an earlier run (its ``meta/{id}.json`` exists)."""
    return (Path(out_dir) / "meta" / f"{item_id}.json").is_file()


def finished_problem(out_dir: str | Path, item_id: str) -> str | None:
    """What is wrong with a finished item's files (None: as ``meta/{id}.json`` records their size and
    sha256; an item of an older run without records is trusted as before)."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / "meta" / f"{item_id}.json").read_text())
    except (OSError, ValueError):
        return f"meta/{item_id}.json cannot be read"
    if not isinstance(meta, dict):
        return f"meta/{item_id}.json is damaged"
    return folder_problem(out_dir, meta.get("files", {}))


def _skip_finished(out_dir: Path, item_id: str) -> bool:
    """Whether ``item_id`` is finished and its files are as recorded; a damaged one is done again (a
    ``warning:`` line names the file)."""
    if not is_finished(out_dir, item_id):
        return False
    problem = finished_problem(out_dir, item_id)
    if problem is None:
        return True
    tqdm.write(f"warning: {item_id}: {problem}; preprocessing it again")
    (out_dir / "meta" / f"{item_id}.json").unlink(missing_ok=True)
    return False


def process_hdtf_item(
    item_id: str,
    source: str | Path,
    out_dir: str | Path,
    toolkit: Toolkit,
    *,
    size: int = 256,
    fps: float = FPS,
    frame_format: str = "jpg",
    jpeg_quality: int = 95,
    max_frames: int | None = None,
    hubert: bool = False,
    workers: int = 4,
) -> dict[str, Any]:
    """Build the frames/keypoints (and optionally audio/HuBERT) of one video; returns its meta dict."""
    from data.imageops import resize_crop
    from data.video import write_frame_folder

    out_dir, source = Path(out_dir), Path(source)
    started = time.time()
    frames = _read_frames(source, fps, max_frames)
    # Frames already extracted into this very tree (the original two-step workflow) stay as they are.
    in_place = source.is_dir() and source.resolve() == (out_dir / "frames" / item_id).resolve()
    if in_place and frames.shape[1:3] != (size, size):
        raise UserError(
            f"{source}: frames are {frames.shape[2]}x{frames.shape[1]}, not {size}x{size}; they are the "
            "output folder's own frames, so they cannot be resized in place; use another --out_dir"
        )
    frames = resize_crop(frames, size)
    kp = face_keypoints(toolkit, frames, source=str(source))
    n = frames.shape[0]

    meta: dict[str, Any] = {
        "id": item_id,
        "source": str(source),
        "n_frames": n,
        "fps": fps,
        "size": size,
        "frame_format": frame_format,
        "n_interpolated": kp["n_interpolated"],
        "format_version": FORMAT_VERSION,
    }
    if hubert:
        from data.audio import load_audio, save_wav

        if source.is_dir():
            raise UserError(
                f"--hubert needs the video (with sound) for {item_id}, got a frame folder {source}"
            )
        if toolkit.hubert is None:
            raise UserError("--hubert given but no HuBERT extractor was built")
        wave = load_audio(source)
        feats = toolkit.hubert(wave, name=str(source))
        meta["hubert_frames"] = int(feats.shape[0])

    # Unfinished leftovers of an interrupted run are replaced as a whole, with its temp files (killed
    # mid-write: ``.{id}.npy.*`` of the atomic writes, ``.{id}.*`` frame folders)
    for d in _item_dirs(out_dir, item_id)[int(in_place) :]:
        if d.exists():
            shutil.rmtree(d)
    for parent in {d.parent for d in _item_dirs(out_dir, item_id)} | {
        out_dir / k for k in ("coeff", "audio", "hubert", "meta")
    }:
        for stale in parent.glob(f".{item_id}.*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if not in_place:
        write_frame_folder(
            out_dir / "frames" / item_id,
            frames,
            ".png" if frame_format == "png" else ".jpg",
            quality=jpeg_quality,
            workers=workers,
        )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = []
        for key, rel in KEYPOINT_DIRS.items():
            futures += _write_per_frame(pool, out_dir / rel / item_id, kp[key], _npy_writer, ".npy")
        for f in futures:
            f.result()
    save_npy(out_dir / "coeff" / f"{item_id}.npy", kp["coeff"])
    if hubert:
        save_wav(out_dir / "audio" / f"{item_id}.wav", wave)
        save_npy(out_dir / "hubert" / f"{item_id}.npy", feats)
    meta["seconds"] = round(time.time() - started, 2)
    written = [*_item_dirs(out_dir, item_id)[int(in_place) :], out_dir / "coeff" / f"{item_id}.npy"]
    if hubert:
        written += [out_dir / "audio" / f"{item_id}.wav", out_dir / "hubert" / f"{item_id}.npy"]
    meta["files"] = path_records(out_dir, written)  # checked before a rerun skips this id
    atomic_write_text(out_dir / "meta" / f"{item_id}.json", json.dumps(meta, indent=1))
    return meta


def build_hdtf(
    sources: dict[str, Path],
    out_dir: str | Path,
    toolkit: Toolkit,
    *,
    shard: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    fail_fast: bool = False,
    progress: bool = True,
    ranks: Ranks | None = None,
    **item_kwargs: Any,
) -> dict[str, Any]:
    """Process this shard's ids (finished ones skipped unless ``overwrite``); with ``ranks``
    (:mod:`moditalker.bulk`) this rank's share instead of ``shard`` / ``num_shards``.

    Returns ``{"done": [...], "skipped": [...], "failed": {id: message}}``. A video that cannot be
    used (no face, unreadable) is reported and the run goes on, unless ``fail_fast``.
    """
    out_dir = Path(out_dir)

    def process(item_id: str) -> None:
        if overwrite:
            (out_dir / "meta" / f"{item_id}.json").unlink(missing_ok=True)
        process_hdtf_item(item_id, sources[item_id], out_dir, toolkit, **item_kwargs)

    return run_items(
        ranks.share(sources) if ranks else select_shard(sources, shard, num_shards),
        lambda item_id: not overwrite and _skip_finished(out_dir, item_id),
        process,
        desc="hdtf" if ranks else f"hdtf shard {shard}/{num_shards}",
        unit="video",
        fail_fast=fail_fast,
        progress=progress,
        ranks=ranks,
    )


def run_items(
    ids: list[str],
    skip: Callable[[str], bool],
    process: Callable[[str], Any],
    *,
    desc: str,
    unit: str,
    fail_fast: bool,
    progress: bool,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Run ``process`` on every id that ``skip`` does not skip, under a progress bar (this rank's, with
    ``ranks``). A ``UserError`` (an unusable item) is reported and the run goes on, unless ``fail_fast``.

    Returns ``{"done": [...], "skipped": [...], "failed": {id: message}}``.
    """
    report: dict[str, Any] = {"done": [], "skipped": [], "failed": {}}
    todo = []
    for item_id in ids:
        (report["skipped"] if skip(item_id) else todo).append(item_id)
    ranks = ranks or Ranks()
    if ranks.world > 1:
        ranks.log(f"{desc}: {len(ids)} {unit}s in this rank's share, {len(todo)} to do")
    bar = ranks.bar(todo, desc=desc, unit=unit, disable=not progress)
    for item_id in bar:
        bar.set_postfix_str(item_id)
        try:
            process(item_id)
            report["done"].append(item_id)
        except UserError as exc:
            if fail_fast:
                raise
            report["failed"][item_id] = str(exc)
            tqdm.write(f"{'[' + ranks.name + '] ' if ranks.name else ''}skipping {item_id}: {exc}")
    return report


# ------------------------------------------------------------------------------------------------
# LRS3


def process_lrs3_clip(
    source: str | Path, out_path: str | Path, toolkit: Toolkit, min_frames: int = 1
) -> dict:
    """One LRS3 clip -> ``.npz`` with ``hubert [2T, D]``, ``idexp_lm3d [T, 68, 3]``, ``coeff [T, 257]``."""
    from data.audio import load_audio

    if toolkit.hubert is None:
        raise UserError("the LRS3 builder needs a HuBERT extractor")
    source = Path(source)
    wave = load_audio(source)
    feats = toolkit.hubert(wave, name=str(source))
    n = feats.shape[0] // 2
    if n < max(1, min_frames):
        raise UserError(f"{source}: only {n} frames of audio (< --min_frames {min_frames})")
    frames = _read_frames(source, FPS, max_frames=n)
    n = min(n, frames.shape[0])
    kp = face_keypoints(toolkit, frames[:n], source=str(source))
    out = {
        "hubert": feats[: 2 * n].astype(np.float32),
        "idexp_lm3d": kp["idexp_lm3d"][:n],
        "coeff": kp["coeff"][:n],
    }
    with atomic_path(out_path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    return {"frames": n, "interpolated": kp["n_interpolated"]}


def _skip_npz(path: Path, item_id: str) -> bool:
    """Whether the clip's ``.npz`` is there and reads back whole (the zip's CRCs); a damaged one is
    made again (a ``warning:`` line names it)."""
    if not path.is_file():
        return False
    problem = npz_problem(path)
    if problem is None:
        return True
    tqdm.write(f"warning: {item_id}: {problem}; preprocessing it again")
    return False


def npz_name(item_id: str) -> str:
    """Flat file name of an LRS3 clip id (``trainval/abc/50001`` -> ``trainval_abc_50001.npz``)."""
    return item_id.replace("/", "_") + ".npz"


def build_lrs3(
    sources: dict[str, Path],
    out_dir: str | Path,
    toolkit: Toolkit,
    *,
    shard: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    fail_fast: bool = False,
    min_frames: int = 1,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Process this shard's (with ``ranks``: this rank's) clips to ``{out_dir}/{npz_name(id)}``
    (existing ones kept unless overwrite)."""
    out_dir = Path(out_dir)
    return run_items(
        ranks.share(sources) if ranks else select_shard(sources, shard, num_shards),
        lambda item_id: not overwrite and _skip_npz(out_dir / npz_name(item_id), item_id),
        lambda item_id: process_lrs3_clip(
            sources[item_id], out_dir / npz_name(item_id), toolkit, min_frames=min_frames
        ),
        desc="lrs3" if ranks else f"lrs3 shard {shard}/{num_shards}",
        unit="clip",
        fail_fast=fail_fast,
        progress=progress,
        ranks=ranks,
    )
