"""Build the MToV latent cache: ``python -m MToV.cache_latents --ae_rgb A --ae_ldmk B data.root=HDTF
--out DIR [--stride S] [--dtype fp32|bf16|fp16]`` (also ``scripts/cache_mtov_latents.sh``).

For every video of both splits and every ``stride``-th 16-frame window (plus the held-out videos'
evaluation windows), the four latents the diffusion trainer computes per step (see
:mod:`MToV.latents` for the layout): the frames are read once per video (not once per window), cut
into windows and encoded in batches on the device exactly as the trainer's ``LatentBatcher`` does
(RGB autoencoder on the frames | masked frames | reference clip in one call, landmark autoencoder on
the landmark clip), in fp32 unless ``--precision`` says otherwise.

* Sharded by video: ``accelerate launch`` processes (``NUM_PROCESSES=N`` / ``NUM_MACHINES``) and
  independent jobs (``--num_shards N --shard K``) each build a disjoint set of videos (longest first,
  balanced by frames); whichever finishes last writes ``manifest.json``.
* Resumable: a rerun skips the videos already in and removes what a killed run left half-written.
* Checked: each video's ``video.json`` records the size and sha256 of its arrays; a rerun checks every
  built video against them and builds a missing, truncated or changed one again (a ``warning:``
  line names it); a video of an older build without records is checked by reading its arrays' headers
  and sizes, then recorded. A ``video.json`` that is not a record of the video (not JSON, not an
  object, wrong counts or records) is a damaged video, built again; a ``manifest.json`` that cannot be
  read, is damaged or does not match the built videos is written again from their records (a
  ``warning:`` line), and a damaged ``build.json`` from an intact manifest's settings.
* Latents with NaN or Inf (a damaged or diverged checkpoint) stop the build with one line naming the
  autoencoder's checkpoint and the video; nothing of that video is written.
* Before it starts it prints the disk the whole cache needs (and what is still to build), and stops
  with one ``error: no space left on device ...`` line when what it still has to build does not fit;
  each video's arrays are allocated on disk before they are filled (a full disk is that one line, not
  a crash in the memory map).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from moditalker.config import load_config
from moditalker.errors import (
    DiskFullError,
    UserError,
    check_space,
    cli_main,
    describe,
    is_disk_full,
    script_prog,
)
from moditalker.fileio import atomic_write_text, folder_records, repo_path
from moditalker.training.bad_items import READ_ERRORS
from MToV.cache_manifest import recorded_settings, write_manifest
from MToV.dataset import ALL_KEYS, build_dataset
from MToV.latents import (
    BUILD,
    DTYPES,
    KINDS,
    MANIFEST,
    bytes_per_window,
    check_built,
    grid_starts,
    latent_shapes,
    run_settings,
    to_storage,
    val_starts,
)
from MToV.loading import build_models
from MToV.models.autoencoder import load_autoencoder_weights

ENCODE_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autoencoders(cfg: DictConfig):
    """The two frozen autoencoders of a trainer config, built as the trainer builds them (same seed;
    the UNet is built too and dropped, so a random run draws the very same weights) and loaded."""
    from accelerate.utils import set_seed

    set_seed(int(cfg.train.seed))
    ae_rgb, ae_ldmk, _ = build_models(cfg)
    if not cfg.random_autoencoders:
        load_autoencoder_weights(ae_rgb, repo_path(cfg.checkpoints.ae_rgb), "MToV RGB autoencoder")
        load_autoencoder_weights(ae_ldmk, repo_path(cfg.checkpoints.ae_ldmk), "MToV landmark autoencoder")
    return ae_rgb, ae_ldmk


def plan_videos(cfg: DictConfig, timesteps: int, resolution: int, stride: int):
    """Every video of both splits with its window starts, the ids of each split, and a dataset that
    reads the frames of every video (:meth:`MToV.dataset.HDTFClipDataset.read_frames`)."""
    sets = {}
    for split in ("train", "test"):
        sets[split] = build_dataset(cfg.data, split, ALL_KEYS, timesteps, resolution, skip_unreadable=False)
    videos: dict[str, dict] = {}
    for split, d in sets.items():
        for vid, paths in d.videos:
            v = videos.setdefault(vid, {"id": vid, "frames": len(paths), "paths": paths, "starts": set()})
            if split == "train":
                v["starts"].update(grid_starts(len(paths), timesteps, stride))
            else:
                v["starts"].update(val_starts(len(paths), timesteps, int(cfg.data.val_clips_per_video)))
    for v in videos.values():
        v["starts"] = sorted(v["starts"])
    splits = {split: [vid for vid, _ in d.videos] for split, d in sets.items()}
    reader = sets["train"]  # one reader for every video: the train split's, holding both splits' videos
    reader.videos = [(v["id"], v["paths"]) for k, v in sorted(videos.items())]
    return [videos[k] for k in sorted(videos)], splits, reader


def assign_shards(videos: list[dict], n_shards: int) -> list[list[dict]]:
    """Longest first onto the least loaded shard (deterministic: ties by id)."""
    shards: list[list[dict]] = [[] for _ in range(n_shards)]
    load = [0] * n_shards
    for v in sorted(videos, key=lambda v: (-len(v["starts"]), v["id"])):
        k = min(range(n_shards), key=lambda i: (load[i], i))
        shards[k].append(v)
        load[k] += len(v["starts"])
    return shards


class ChunkReader(Dataset):
    """Item ``i``: the frames of one chunk of consecutive windows of one video, read once (workers)."""

    def __init__(self, reader, chunks: list[tuple[dict, list[int]]], timesteps: int) -> None:
        self.reader, self.chunks, self.timesteps = reader, chunks, timesteps
        self.index = {vid: i for i, (vid, _) in enumerate(reader.videos)}

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        video, starts = self.chunks[i]
        first, stop = starts[0], min(starts[-1] + self.timesteps, video["frames"])
        try:
            frames = self.reader.read_frames(self.index[video["id"]], first, stop)
        except READ_ERRORS as exc:
            return {"chunk": i, "error": describe(exc)}
        return {"chunk": i, "first": first, **frames}


def windows(frames: dict, starts: list[int], first: int, timesteps: int, device) -> dict[str, torch.Tensor]:
    """Per-frame tensors -> the trainer's four clips ``[N, 3, T, S, S]`` for windows ``starts``
    (front-padded with black frames when the video is shorter than a window, as the dataset does)."""
    out = {}
    for key in ("x", "masked_x", "x_l"):
        f = frames[key].to(device)  # [3, F, S, S]
        clips = []
        for s in starts:
            clip = f[:, s - first : s - first + timesteps]
            pad = timesteps - clip.shape[1]
            if pad:
                clip = torch.cat([clip.new_full((3, pad, *clip.shape[2:]), -1.0), clip], dim=1)
            clips.append(clip)
        out[key] = torch.stack(clips)
    x = frames["x"].to(device)
    out["x_ref"] = torch.stack(
        [x[:, s - first : s - first + 1].expand(-1, timesteps, -1, -1) for s in starts]
    )
    return out


@torch.no_grad()
def encode(ae_rgb, ae_ldmk, clips: dict, precision: str) -> dict[str, torch.Tensor]:
    """The trainer's ``LatentBatcher`` on a batch of windows: z, z_l, masked_z, ref (xy-plane)."""
    device = clips["x"].device
    with torch.autocast(
        device.type,
        dtype=ENCODE_PRECISIONS[precision] or torch.float32,
        enabled=ENCODE_PRECISIONS[precision] is not None,
    ):
        b = clips["x"].shape[0]
        z, masked_z, ref = (
            ae_rgb.extract(torch.cat([clips["x"], clips["masked_x"], clips["x_ref"]])).float().split(b)
        )
        z_l = ae_ldmk.extract(clips["x_l"]).float()
    return {"z": z, "z_l": z_l, "masked_z": masked_z, "ref": ref[:, :, : ae_rgb.r**2]}


class LatentWriter:
    """One video's arrays, written into ``videos/{id}.tmp-HOST-PID`` and renamed into place at the end."""

    def __init__(self, out: Path, video: dict, shapes: dict, dtype: str) -> None:
        self.final = out / "videos" / video["id"]
        self.tmp = out / "videos" / f"{video['id']}.tmp-{socket.gethostname()}-{os.getpid()}"
        self.tmp.mkdir(parents=True)
        self.video, self.dtype, self.filled = video, dtype, 0
        n = len(video["starts"])
        try:
            self.arrays = {
                k: np.lib.format.open_memmap(self.tmp / f"{k}.npy", "w+", DTYPES[dtype], (n, *shapes[k]))
                for k in KINDS
            }
            for k in KINDS:  # the blocks on disk now: a full disk is an OSError here, not a SIGBUS later
                with open(self.tmp / f"{k}.npy", "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            self.abort()
            if is_disk_full(exc):
                raise DiskFullError(self.final, needs=n * bytes_per_window(shapes, dtype)) from exc
            raise

    def abort(self) -> None:
        """Remove the half-written video."""
        getattr(self, "arrays", {}).clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, latents: dict[str, torch.Tensor]) -> None:
        n = latents["z"].shape[0]
        for k in KINDS:
            self.arrays[k][self.filled : self.filled + n] = to_storage(latents[k], self.dtype)
        self.filled += n

    def finish(self) -> None:
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()
        try:
            np.save(self.tmp / "starts.npy", np.asarray(self.video["starts"], np.int64))
            meta = {"id": self.video["id"], "frames": self.video["frames"], "windows": self.filled}
            meta["files"] = folder_records(self.tmp)  # size + sha256 of each array: checked on resume
            (self.tmp / "video.json").write_text(json.dumps(meta) + "\n")
        except OSError as exc:
            self.abort()
            if is_disk_full(exc):
                raise DiskFullError(self.final, at_least=1) from exc
            raise
        os.replace(self.tmp, self.final)  # the video appears complete or not at all


def prepare_out(out: Path, settings: dict, overwrite: bool) -> None:
    """Check (or start) the cache folder: the same settings resume it, ``--overwrite`` rebuilds it."""
    build = out / BUILD
    if not overwrite:
        if build.exists():
            old = recorded_settings(out, settings)
            keys = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            if keys:
                raise UserError(
                    f"{out} holds a latent cache built with other settings ({', '.join(keys)} differ); "
                    "pass --overwrite to rebuild it, or choose another --out"
                )
            return
        if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise UserError(
                f"--out {out} already holds files but no {BUILD} (not a latent cache this command can "
                "resume); pass --overwrite to rebuild it there, or choose another folder"
            )
    for p in (out / MANIFEST, out / BUILD, out / "videos"):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(build, json.dumps(settings, indent=1))


def estimate(videos: list[dict], done: set[str], per_window: int, out: Path, dtype: str) -> str:
    total = sum(len(v["starts"]) for v in videos)
    todo = sum(len(v["starts"]) for v in videos if v["id"] not in done)
    free = shutil.disk_usage(out).free
    need = todo * per_window
    line = (
        f"latent cache: {len(videos)} videos, {total} windows x {per_window / 1024:.1f} KiB ({dtype}) = "
        f"{total * per_window / 2**30:.2f} GiB; to build: {todo} windows, {need / 2**30:.2f} GiB; "
        f"free at {out}: {free / 2**30:.1f} GiB"
    )
    if need > free:
        line += "  (not enough free disk)"
    return line


def chunk_starts(starts: Sequence[int], batch: int, stride: int) -> list[list[int]]:
    """Consecutive starts in chunks of at most ``batch`` windows spanning at most ``batch`` strides
    (evaluation windows far from the others get their own chunk, not a read of the frames between)."""
    chunks: list[list[int]] = []
    for s in starts:
        if chunks and len(chunks[-1]) < batch and s - chunks[-1][0] < batch * stride:
            chunks[-1].append(s)
        else:
            chunks.append([s])
    return chunks


def build_cache(
    cfg: DictConfig,
    out: str | Path,
    stride: int = 1,
    dtype: str = "fp32",
    precision: str = "fp32",
    batch_size: int = 8,
    num_shards: int = 1,
    shard: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build (or continue) the cache of ``cfg`` (a diffusion trainer config) in ``out``; see the module
    doc. Returns ``{"out", "videos", "windows", "built", "complete"}`` (``built``: videos this call
    wrote)."""
    from moditalker.device import resolve_device
    from moditalker.training.accelerator import start_accelerator

    out = Path(out)
    if stride < 1 or batch_size < 1:
        raise UserError(f"--stride and --batch_size must be >= 1, got {stride} and {batch_size}")
    if dtype not in DTYPES or precision not in ENCODE_PRECISIONS:
        raise UserError(
            f"--dtype and --precision must be one of {', '.join(DTYPES)}; got {dtype}, {precision}"
        )
    if not 0 <= shard < num_shards:
        raise UserError(f"--shard must be in 0 .. --num_shards - 1 = {num_shards - 1}, got {shard}")
    if overwrite and num_shards > 1:
        raise UserError(
            "--overwrite with --num_shards > 1 would let each job wipe the others' videos; "
            "remove the folder once, then start the shards without --overwrite"
        )
    device = resolve_device(cfg.train.device)
    acc = start_accelerator("MToV latent cache", device, cpu=device.type == "cpu")
    main_proc = acc.is_main_process
    ae_rgb, ae_ldmk = autoencoders(cfg)
    settings = {
        **run_settings(cfg, ae_rgb, ae_ldmk),
        "stride": stride,
        "dtype": dtype,
        "precision": precision,
    }
    for ae in (ae_rgb, ae_ldmk):
        ae.to(acc.device).eval().requires_grad_(False)
    t = ae_rgb.timesteps
    videos, splits, reader = plan_videos(cfg, t, ae_rgb.res, stride)
    shapes = latent_shapes(ae_rgb.embed_dim, ae_rgb.latent_length, ae_rgb.r**2)
    if main_proc:
        prepare_out(out, settings, overwrite)
    acc.wait_for_everyone()
    if not main_proc:
        prepare_out(out, settings, overwrite=False)  # the settings check, on every process
    per_window = bytes_per_window(shapes, dtype)
    world, rank = num_shards * acc.num_processes, shard * acc.num_processes + acc.process_index
    mine = {v["id"] for v in assign_shards(videos, world)[rank]}
    done = set()
    for v in videos:
        folder = out / "videos" / v["id"]
        if not (folder / "video.json").is_file():
            if folder.is_dir() and v["id"] in mine:  # no video.json: not a built video, made again
                shutil.rmtree(folder)  # (the finished one is renamed to this name)
            continue
        problem = (
            check_built(folder, len(v["starts"]), shapes, dtype, v["frames"]) if v["id"] in mine else None
        )
        if problem is None:
            done.add(v["id"])
            continue
        print(f"warning: latent cache video {v['id']}: {problem}; building it again", file=sys.stderr)
        shutil.rmtree(folder)
    if main_proc and shard == 0:
        print(estimate(videos, done, per_window, out, dtype), flush=True)
    mine = assign_shards(videos, world)[rank]
    for v in mine:  # what a killed run of this shard left: half-written videos, unreadable markers
        for stale in (out / "videos").glob(f"{v['id']}.tmp-*"):
            shutil.rmtree(stale)
        (out / "videos" / f"{v['id']}.unreadable").unlink(missing_ok=True)
    pending = [v for v in mine if v["id"] not in done]
    # checked before the first window is encoded (each video also allocates its blocks before filling)
    check_space(out, sum(len(v["starts"]) for v in pending) * per_window, out / "videos")
    chunks = [(v, c) for v in pending for c in chunk_starts(v["starts"], batch_size, stride)]
    last_chunk = {v["id"]: i for i, (v, _) in enumerate(chunks)}  # the last index of each video wins
    loader = DataLoader(
        ChunkReader(reader, chunks, t), batch_size=None, num_workers=int(cfg.data.num_workers)
    )
    bar = tqdm(total=sum(len(c) for _, c in chunks), disable=not progress, desc=f"latents {rank + 1}/{world}")
    writer, skipping, built = None, None, 0
    for item in loader:
        video, starts = chunks[int(item["chunk"])]
        if video["id"] == skipping:
            bar.update(len(starts))
            continue
        if "error" in item:
            print(f"warning: skipped unreadable video {video['id']}: {item['error']}", file=sys.stderr)
            atomic_write_text(out / "videos" / f"{video['id']}.unreadable", item["error"] + "\n")
            if writer is not None:
                shutil.rmtree(writer.tmp)
            writer, skipping = None, video["id"]
            bar.update(len(starts))
            continue
        if writer is None:
            (out / "videos").mkdir(parents=True, exist_ok=True)
            writer = LatentWriter(out, video, shapes, dtype)
        clips = windows(item, starts, int(item["first"]), t, acc.device)
        latents = encode(ae_rgb, ae_ldmk, clips, precision)
        if nonfinite := [k for k in KINDS if not bool(torch.isfinite(latents[k]).all())]:
            writer.abort()
            raise UserError(nonfinite_message(cfg, video["id"], starts, nonfinite, precision))
        writer.add(latents)
        bar.update(len(starts))
        if int(item["chunk"]) == last_chunk[video["id"]]:
            writer.finish()
            writer, built = None, built + 1
    bar.close()
    acc.wait_for_everyone()
    complete = (out / MANIFEST).is_file()
    if main_proc:  # also checks the manifest a former run wrote, and writes it again when damaged
        complete = write_manifest(out, settings, videos, splits, shapes, float(cfg.data.max_bad_items))
        if not complete:
            print(
                f"this shard is built; {out / MANIFEST} is written when the other shards finish", flush=True
            )
    return {
        "out": str(out),
        "videos": len(videos),
        "windows": sum(len(v["starts"]) for v in videos),
        "built": built,
        "complete": complete,
    }


def nonfinite_message(cfg: DictConfig, vid: str, starts: list[int], kinds: list[str], precision: str) -> str:
    """The error of latents with NaN or Inf: which autoencoder (checkpoint) made them, of which video."""
    which = [("ldmk", "landmark") if k == "z_l" else ("rgb", "RGB") for k in kinds]
    names = []
    for key, what in dict.fromkeys(which):
        source = "random weights" if cfg.random_autoencoders else str(repo_path(cfg.checkpoints[f"ae_{key}"]))
        names.append(f"the {what} autoencoder ({source})")
    hint = "; or encode in fp32 (--precision fp32)" if precision != "fp32" else ""
    return (
        f"{' and '.join(names)} made latents with NaN or Inf ({', '.join(kinds)}) for video {vid}, windows "
        f"from frame {starts[0]} to {starts[-1]}: the checkpoint is damaged or its training diverged; "
        f"nothing of that video was written. Cache the latents of a sound checkpoint{hint}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=script_prog("python -m MToV.cache_latents"),
        description="Encode every training window of HDTF once with the frozen MToV autoencoders (the "
        "latent cache that diffusion training reads with data.latents=DIR). Resumable, sharded by video.",
    )
    p.add_argument("--config", default="configs/mtov_diffusion.yaml", help="the diffusion trainer's config")
    p.add_argument("--ae_rgb", default=None, help="RGB autoencoder checkpoint (checkpoints.ae_rgb)")
    p.add_argument("--ae_ldmk", default=None, help="landmark autoencoder checkpoint (checkpoints.ae_ldmk)")
    p.add_argument("--out", default=None, help="cache folder (required)")
    p.add_argument("--stride", type=int, default=1, help="cache every S-th window start [1: all of them]")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="storage precision [fp32]")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=tuple(ENCODE_PRECISIONS),
        help="autocast of the encoders [fp32: the frame-based trainer's default]",
    )
    p.add_argument("--batch_size", type=int, default=8, help="windows per encoder call [8]")
    p.add_argument("--device", default=None, help="auto|cpu|cuda|cuda:N (overrides train.device)")
    p.add_argument("--num_shards", type=int, default=1, help="independent jobs building one cache [1]")
    p.add_argument("--shard", type=int, default=0, help="this job's shard, 0 .. num_shards-1 [0]")
    p.add_argument("--overwrite", action="store_true", help="rebuild a cache folder from scratch")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.root=/path/to/HDTF")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    from MToV.train_diffusion import DEFAULTS

    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(repo_path(args.config), args.overrides, DEFAULTS)
    if args.ae_rgb is not None:
        cfg.checkpoints.ae_rgb = args.ae_rgb
    if args.ae_ldmk is not None:
        cfg.checkpoints.ae_ldmk = args.ae_ldmk
    if args.device is not None:
        cfg.train.device = args.device
    if args.out is None:
        raise UserError("set --out DIR (the latent cache folder)")
    if cfg.data.root is None:
        raise UserError("set data.root=/path/to/HDTF (a folder with frames/ and keypoints/)")
    result = build_cache(
        cfg,
        args.out,
        args.stride,
        args.dtype,
        args.precision,
        args.batch_size,
        args.num_shards,
        args.shard,
        args.overwrite,
        not args.no_progress,
    )
    if result["complete"]:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli_main(main)
