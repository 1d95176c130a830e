"""Dataset builders' CLI: HDTF-style frame/keypoint trees for MToV and LRS3-style ``.npz`` clips for AToM
(the builders themselves are in :mod:`data.builders`).

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

Fixed on purpose (see docs/differences.md): the original passed HWC frames to a routine that reads the
height from a CHW shape, so its y-flip became ``2 - y`` and the POS crop missed the face; here the
frames keep their layout and every flip uses the true image height. The FAN landmarks are stored as
detected (y down), not flipped.

Runs are resumable (finished ids, those with ``meta/{id}.json``, are skipped) and spread over
processes (:mod:`moditalker.bulk`): under the launcher (``NUM_PROCESSES=N scripts/preprocess_hdtf.sh``)
and/or as independent jobs (``--shard K --num_shards N``) each rank takes every world-th id of the
sorted list on its own device, with its own tqdm bar; a video that cannot be used is reported and the
others go on, and at the end rank 0 lists every failed id of every rank (exit status 2).

**LRS3** (``python -m data.preprocess lrs3``, ``scripts/preprocess_lrs3.sh``): every clip
``{root}/{split}/{speaker}/{clip}.mp4`` becomes one flat file ``{out_dir}/{split}_{speaker}_{clip}.npz``
(the folder layout :mod:`AToM.dataset` reads: ``{out_dir}/*.npz``) with ``hubert`` float32 ``[2T, 1024]``,
``idexp_lm3d`` float32 ``[T, 68, 3]`` (``10 * (B_id id + B_exp exp)`` at the 68 keypoints, the space
AToM is trained in) and ``coeff`` float32 ``[T, 257]``; ``T = min(video frames, HuBERT frames // 2)``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.builders import (
    KEYPOINT_DIRS,
    Toolkit,
    build_hdtf,
    build_lrs3,
    face_keypoints,
    find_sources,
    npz_name,
    process_hdtf_item,
    process_lrs3_clip,
    select_shard,
)
from moditalker import bulk
from moditalker.assets import warn_random_weights
from moditalker.bulk import add_shard_args
from moditalker.constants import FPS
from moditalker.errors import UserError, cli_main, script_prog

__all__ = [
    "KEYPOINT_DIRS",
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
    hubert_dim: int = 1024,
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
        hub = HubertExtractor.random(hidden_size=hubert_dim, device=dev) if need_hubert else None
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
    add_shard_args(ap, "ids")
    ap.add_argument(
        "--device", default="auto", help="auto|cpu|cuda|cuda:N (auto under the launcher: cuda:LOCAL_RANK)"
    )
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
    ap.add_argument(
        "--hubert_dim",
        type=int,
        default=1024,
        help="width of the random HuBERT with --random_weights (16 for configs/atom_tiny.yaml) [1024]",
    )
    ap.add_argument("--overwrite", action="store_true", help="redo finished ids")
    ap.add_argument("--fail_fast", action="store_true", help="stop at the first unusable video")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m data.preprocess", description="Dataset builders (HDTF, LRS3)."
    )
    sub = ap.add_subparsers(dest="dataset", required=True)
    # scripts/preprocess_{hdtf,lrs3}.sh name the dataset themselves: their usage line is the script's
    script = {"prog": script_prog("")} if script_prog("") else {}
    h = sub.add_parser("hdtf", help="videos -> frames + keypoint tree for MToV", **script)
    h.add_argument(
        "--videos", required=True, help="folder of {id}.mp4, {id}/video.mp4 or {id}/ frame folders"
    )
    _common_args(h)
    h.add_argument("--size", type=int, default=256, help="square frame size after centre crop")
    h.add_argument("--fps", type=float, default=FPS, help="frame rate to resample to")
    h.add_argument("--frame_format", choices=("jpg", "png"), default="jpg")
    h.add_argument("--max_frames", type=int, default=None, help="use only the first N frames of each video")
    h.add_argument("--hubert", action="store_true", help="also write audio/{id}.wav and hubert/{id}.npy")
    l3 = sub.add_parser(
        "lrs3", help="LRS3 clips -> flat {split}_{speaker}_{clip}.npz (hubert, idexp_lm3d)", **script
    )
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
    """Run one builder on this rank's share of the ids; rank 0 raises one UserError (exit 2) naming
    every id that failed on any rank."""
    args = build_parser().parse_args(argv)
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
    bulk.check_shard(args.shard, args.num_shards)  # before building networks
    if args.hubert_dim < 4 or args.hubert_dim % 4:
        raise UserError(f"--hubert_dim must be a positive multiple of 4, got {args.hubert_dim}")
    if args.hubert_dim != 1024 and not args.random_weights:
        raise UserError("--hubert_dim sets the random HuBERT's width: it needs --random_weights")
    ranks = bulk.start(args.shard, args.num_shards)
    try:
        return _run(args, sources, ranks)
    finally:
        ranks.close()


def _run(args: argparse.Namespace, sources: dict[str, Path], ranks: bulk.Ranks) -> dict[str, Any]:
    from moditalker.config import save_config

    out_dir = Path(args.out_dir)
    is_hdtf = args.dataset == "hdtf"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.random_weights:
        warn_random_weights(
            "HuBERT and Deep3DFaceRecon are",
            "FAN is a fixed template face and the BFM is synthetic: the dataset is NOT real training data.",
        )
    toolkit = build_toolkit(
        device=ranks.device(args.device),
        bfm_dir=args.bfm_dir,
        deep3d=args.deep3d,
        fan_dir=args.fan_dir,
        hubert_model=args.hubert_model,
        need_hubert=(not is_hdtf) or args.hubert,
        allow_download=args.allow_download,
        random_weights=args.random_weights,
        workdir=out_dir / "random_weights" / f"shard{ranks.rank}of{ranks.world}",
        hubert_dim=args.hubert_dim,
    )
    save_config(vars(args), out_dir / "configs" / f"{args.dataset}_shard{ranks.rank}of{ranks.world}.yaml")
    common = dict(ranks=ranks, overwrite=args.overwrite, fail_fast=args.fail_fast)
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
    ranks.log(
        f"{args.dataset}: {len(report['done'])} done, {len(report['skipped'])} already finished, "
        f"{len(report['failed'])} failed -> {out_dir}"
    )
    ranks.finish(report["failed"], total=len(sources), what="videos" if is_hdtf else "clips")
    return report


if __name__ == "__main__":
    cli_main(main)
