"""Dataset builders: HDTF-style frame/keypoint trees for MToV and LRS3-style ``.npz`` clips for AToM.

**HDTF** (``python -m data.preprocess hdtf``, ``scripts/preprocess_hdtf.sh``): every video (or
folder of frames) becomes::

    frames/{id}/{frame:05d}.jpg                                   RGB, centre crop + resize (256)
    keypoints/face-centric/unposed/{id}/{frame:05d}.npy           float32 [68, 3] frontal BFM landmarks
    keypoints/face-centric/posed/{id}/{frame:05d}.npy             float32 [68, 3] re-posed (R, t of the frame)
    keypoints/non-face-centric/posed/{id}/{frame:05d}.npy         float32 [68, 2] pixels in the frame (MToV)
    keypoints/fa/{id}/{frame:05d}.npy                             float32 [68, 2] FAN landmarks (x, y down)
    coeff/{id}.npy                                                float32 [T, 257] 3DMM coefficients
    audio/{id}.wav, hubert/{id}.npy                               16 kHz mono + HuBERT (``--hubert``)
    meta/{id}.json                                                written last: marks the id as finished

Steps: decode at 25 fps (PyAV) -> centre square crop + bilinear resize -> 2D FAN landmarks (frames
without a face interpolated) -> Deep3DFaceRecon coefficients -> ``idexp_lm3d / 10 + key_mean_shape``
(unposed) -> ``v @ R + t`` (posed) -> re-pose / project / de-align / snap with
:func:`data.motion_align.align_landmarks` (non-face-centric). Using the very function the inference
aligner uses makes the MToV training keypoints and the inference keypoints the same construction.

Fixed on purpose (SPEC section 3.3): the original passed HWC frames to a routine that reads the
height from a CHW shape, so its y-flip became ``2 - y`` and the POS crop missed the face; here the
frames keep their layout and every flip uses the true image height. The FAN landmarks are stored as
detected (y down), not flipped.

Runs are resumable (finished ids, those with ``meta/{id}.json``, are skipped) and shardable
(``--shard i --num_shards n`` takes every n-th id of the sorted list), one tqdm bar per process.

**LRS3** (``python -m data.preprocess lrs3``, ``scripts/preprocess_lrs3.sh``): every clip
``{root}/{split}/{speaker}/{clip}.mp4`` becomes one flat file ``{out_dir}/{split}_{speaker}_{clip}.npz``
(the folder layout :mod:`AToM.dataset` reads: ``{out_dir}/*.npz``) with ``hubert`` float32 ``[2T, 1024]``,
``idexp_lm3d`` float32 ``[T, 68, 3]`` (``10 * (B_id id + B_exp exp)`` at the 68 keypoints, the space
AToM is trained in) and ``coeff`` float32 ``[T, 257]``; ``T = min(video frames, HuBERT frames // 2)``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from data.video import IMAGE_SUFFIXES
from moditalker.constants import FPS
from moditalker.errors import UserError, cli_main
from moditalker.fileio import atomic_path, atomic_write_text, save_npy

__all__ = [
    "Toolkit",
    "build_toolkit",
    "find_sources",
    "select_shard",
    "face_keypoints",
    "process_hdtf_item",
    "build_hdtf",
    "process_lrs3_clip",
    "npz_name",
    "build_lrs3",
    "main",
]

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
    """Every ``num_shards``-th id of the sorted list, starting at ``shard`` (disjoint, covering)."""
    if num_shards < 1:
        raise UserError(f"--num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise UserError(
            f"--shard must be in 0..{num_shards - 1} (got {shard} with --num_shards {num_shards})"
        )
    return sorted(ids)[shard::num_shards]


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
    np.save(path, array)


def _item_dirs(out_dir: Path, item_id: str) -> list[Path]:
    return [out_dir / "frames" / item_id] + [out_dir / d / item_id for d in KEYPOINT_DIRS.values()]


def is_finished(out_dir: str | Path, item_id: str) -> bool:
    """Whether ``item_id`` was completed by an earlier run (its ``meta/{id}.json`` exists)."""
    return (Path(out_dir) / "meta" / f"{item_id}.json").is_file()


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

    # Unfinished leftovers of an interrupted run are replaced as a whole.
    for d in _item_dirs(out_dir, item_id)[int(in_place) :]:
        if d.exists():
            shutil.rmtree(d)
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
    **item_kwargs: Any,
) -> dict[str, Any]:
    """Process this shard's ids (finished ones skipped unless ``overwrite``).

    Returns ``{"done": [...], "skipped": [...], "failed": {id: message}}``. A video that cannot be
    used (no face, unreadable) is reported and the run goes on, unless ``fail_fast``.
    """
    out_dir = Path(out_dir)

    def process(item_id: str) -> None:
        if overwrite:
            (out_dir / "meta" / f"{item_id}.json").unlink(missing_ok=True)
        process_hdtf_item(item_id, sources[item_id], out_dir, toolkit, **item_kwargs)

    return run_items(
        select_shard(sources, shard, num_shards),
        lambda item_id: is_finished(out_dir, item_id) and not overwrite,
        process,
        desc=f"hdtf shard {shard}/{num_shards}",
        unit="video",
        fail_fast=fail_fast,
        progress=progress,
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
) -> dict[str, Any]:
    """Run ``process`` on every id that ``skip`` does not skip, under a progress bar. A ``UserError``
    (an unusable item) is reported and the run goes on, unless ``fail_fast``.

    Returns ``{"done": [...], "skipped": [...], "failed": {id: message}}``.
    """
    report: dict[str, Any] = {"done": [], "skipped": [], "failed": {}}
    todo = []
    for item_id in ids:
        (report["skipped"] if skip(item_id) else todo).append(item_id)
    bar = tqdm(todo, desc=desc, unit=unit, disable=not progress)
    for item_id in bar:
        bar.set_postfix_str(item_id)
        try:
            process(item_id)
            report["done"].append(item_id)
        except UserError as exc:
            if fail_fast:
                raise
            report["failed"][item_id] = str(exc)
            tqdm.write(f"skipping {item_id}: {exc}")
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
) -> dict[str, Any]:
    """Process this shard's clips to ``{out_dir}/{npz_name(id)}`` (existing ones kept unless overwrite)."""
    out_dir = Path(out_dir)
    return run_items(
        select_shard(sources, shard, num_shards),
        lambda item_id: (out_dir / npz_name(item_id)).is_file() and not overwrite,
        lambda item_id: process_lrs3_clip(
            sources[item_id], out_dir / npz_name(item_id), toolkit, min_frames=min_frames
        ),
        desc=f"lrs3 shard {shard}/{num_shards}",
        unit="clip",
        fail_fast=fail_fast,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------
# CLI


def build_toolkit(
    *,
    device: str = "auto",
    bfm_dir: str | Path | None = None,
    deep3d: str | Path | None = None,
    fan_dir: str | Path | None = None,
    hubert_model: str | Path | None = None,
    need_hubert: bool = False,
    allow_download: bool = False,
    random_weights: bool = False,
    batch_size: int = 16,
    workdir: str | Path | None = None,
) -> Toolkit:
    """Build detector, 3DMM regressor, BFM helper (and HuBERT) from paths; random stand-ins on request."""
    from data.audio import HubertExtractor
    from data.face3d import Face3DHelper, write_synthetic_bfm
    from data.landmarks import FaceLandmarkDetector, template_face_detector
    from data.recon3d import FaceReconstructor
    from moditalker.assets import default_path
    from moditalker.device import resolve_device

    dev = resolve_device(device)
    if random_weights:
        if bfm_dir is None:
            bfm_dir = write_synthetic_bfm(Path(workdir or ".") / "synthetic_bfm")  # per shard: no write races
        detector = FaceLandmarkDetector(device=dev, detector=template_face_detector)
        recon = FaceReconstructor(bfm_dir=bfm_dir, device=dev, random_weights=True)
        hub = HubertExtractor.random(device=dev) if need_hubert else None
    else:
        bfm_dir = bfm_dir or default_path("bfm_front").parent
        detector = FaceLandmarkDetector(device=dev, weights_dir=fan_dir, allow_download=allow_download)
        recon = FaceReconstructor(weights=deep3d, bfm_dir=bfm_dir, device=dev)
        hub = None
        if need_hubert:
            hub = HubertExtractor(
                hubert_model or default_path("hubert"), device=dev, local_files_only=not allow_download
            )
    return Toolkit(
        detector=detector, reconstructor=recon, face3d=Face3DHelper(bfm_dir, device=dev), hubert=hub
    )


def _common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out_dir", required=True, help="output root")
    ap.add_argument("--ids", nargs="+", default=None, help="only these ids")
    ap.add_argument("--id_list", default=None, help="text file with one id per line")
    ap.add_argument("--shard", type=int, default=0, help="this process's shard index (0-based)")
    ap.add_argument("--num_shards", type=int, default=1, help="number of processes sharing the ids")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    ap.add_argument(
        "--bfm_dir", default=None, help="folder with BFM_model_front.mat + similarity_Lm3D_all.mat"
    )
    ap.add_argument("--deep3d", default=None, help="Deep3DFaceRecon epoch_20.pth")
    ap.add_argument("--fan_dir", default=None, help="folder with the FAN and s3fd weights")
    ap.add_argument("--hubert_model", default=None, help="HuBERT folder or hub id")
    ap.add_argument(
        "--allow_download",
        action="store_true",
        help="let face_alignment / transformers fetch missing weights",
    )
    ap.add_argument(
        "--random_weights", action="store_true", help="random networks + synthetic BFM (smoke test)"
    )
    ap.add_argument("--overwrite", action="store_true", help="redo finished ids")
    ap.add_argument("--fail_fast", action="store_true", help="stop at the first unusable video")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m data.preprocess", description="Dataset builders (HDTF, LRS3)."
    )
    sub = ap.add_subparsers(dest="dataset", required=True)
    h = sub.add_parser("hdtf", help="videos -> frames + keypoint tree for MToV")
    h.add_argument(
        "--videos", required=True, help="folder of {id}.mp4, {id}/video.mp4 or {id}/ frame folders"
    )
    _common_args(h)
    h.add_argument("--size", type=int, default=256, help="square frame size after centre crop")
    h.add_argument("--fps", type=float, default=FPS, help="frame rate to resample to")
    h.add_argument("--frame_format", choices=("jpg", "png"), default="jpg")
    h.add_argument("--max_frames", type=int, default=None, help="use only the first N frames of each video")
    h.add_argument("--hubert", action="store_true", help="also write audio/{id}.wav and hubert/{id}.npy")
    l3 = sub.add_parser("lrs3", help="LRS3 clips -> flat {split}_{speaker}_{clip}.npz (hubert, idexp_lm3d)")
    l3.add_argument("--root", required=True, help="LRS3 folder ({split}/{speaker}/{clip}.mp4, any depth)")
    _common_args(l3)
    l3.add_argument("--min_frames", type=int, default=1, help="skip clips shorter than this (frames)")
    return ap


def _filter_ids(sources: dict[str, Path], ids: Sequence[str] | None, id_list: str | None) -> dict[str, Path]:
    wanted: list[str] = list(ids or [])
    if id_list:
        p = Path(id_list)
        if not p.is_file():
            raise UserError(f"id list not found: {p}")
        wanted += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not wanted:
        return sources
    missing = [i for i in wanted if i not in sources]
    if missing:
        raise UserError(
            f"ids not found in the input folder: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    return {i: sources[i] for i in wanted}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one builder for one shard; exits 2 (UserError) when some inputs failed."""
    from moditalker.config import save_config

    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    is_hdtf = args.dataset == "hdtf"
    if is_hdtf:  # checked here, not once per video after the networks are built
        if args.size < 32:
            raise UserError(f"--size must be at least 32, got {args.size}")
        if not (math.isfinite(args.fps) and args.fps > 0):
            raise UserError(f"--fps must be a positive number, got {args.fps}")
        if args.max_frames is not None and args.max_frames < 1:
            raise UserError(f"--max_frames must be >= 1, got {args.max_frames}")
    sources = find_sources(args.videos if is_hdtf else args.root, recursive=not is_hdtf)
    sources = _filter_ids(sources, args.ids, args.id_list)
    if not sources:
        raise UserError(f"no videos found in {args.videos if is_hdtf else args.root}")
    select_shard(sources, args.shard, args.num_shards)  # validate before building networks
    out_dir.mkdir(parents=True, exist_ok=True)
    toolkit = build_toolkit(
        device=args.device,
        bfm_dir=args.bfm_dir,
        deep3d=args.deep3d,
        fan_dir=args.fan_dir,
        hubert_model=args.hubert_model,
        need_hubert=(not is_hdtf) or args.hubert,
        allow_download=args.allow_download,
        random_weights=args.random_weights,
        workdir=out_dir / "random_weights" / f"shard{args.shard}of{args.num_shards}",
    )
    save_config(vars(args), out_dir / "configs" / f"{args.dataset}_shard{args.shard}of{args.num_shards}.yaml")
    common = dict(
        shard=args.shard, num_shards=args.num_shards, overwrite=args.overwrite, fail_fast=args.fail_fast
    )
    if is_hdtf:
        report = build_hdtf(
            sources,
            out_dir,
            toolkit,
            **common,
            size=args.size,
            fps=args.fps,
            frame_format=args.frame_format,
            max_frames=args.max_frames,
            hubert=args.hubert,
        )
    else:
        report = build_lrs3(sources, out_dir, toolkit, **common, min_frames=args.min_frames)
    print(
        f"{args.dataset}: {len(report['done'])} done, {len(report['skipped'])} already finished, "
        f"{len(report['failed'])} failed -> {out_dir}"
    )
    if report["failed"]:
        listing = "; ".join(f"{k}: {v}" for k, v in list(report["failed"].items())[:5])
        raise UserError(f"{len(report['failed'])} input(s) could not be processed ({listing})")
    return report


if __name__ == "__main__":
    cli_main(main)
