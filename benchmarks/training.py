"""Training speed of the MToV diffusion UNet: the frame-based step against the latent-cache step.

``python -m benchmarks.training [--device cpu|cuda] [--steps N] [--batch_size B] [--tiny]
--json OUT.json`` (also ``scripts/benchmark_training.sh``). Full-size networks with random weights
(speed does not depend on the values; the UNet's zero-initialised output layers get small random
weights so that the losses, and the comparison of the two paths, mean something), on a synthetic
HDTF tree (256 x 256 JPEG frames of a moving face, keypoints) written to a work folder:

1. the latent cache of that tree is built with :func:`MToV.cache_latents.build_cache` (fp32);
2. the first frame-path batch is encoded in fp32 as the trainer does and the same windows are read
   from the cache: with the same timesteps and noise, the loss of every window from both
   (``max_abs_loss_diff``) and from the cache rounded to bf16 (``bf16_cache_max_abs_loss_diff``, what a
   ``--dtype bf16`` cache stores);
3. ``--steps`` training steps of the frame path, then 3x as many of the cache path (they are
   short), with the trainer's loaders (``--workers`` processes), step and optimizer. The frame path
   reads and decodes the frames and keypoints, renders the landmark and masked clips, runs both
   encoders (bf16 autocast where the device has bf16 units, ``--frames_precision``) and the UNet
   step; the cache path reads the latents and runs the UNet step. Data loading is inside every
   step's time; the time spent waiting for a batch is reported too. The UNet step is warmed up
   (one step) before anything is timed; on a GPU the frame path's step too (``--warmup`` steps).

Writes the JSON (``device``, ``batch_size``, ``frames_s_per_step``, ``latents_s_per_step``,
``speedup``, ``max_abs_loss_diff``, ``cache_bytes_per_window``, breakdowns, ...) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from benchmarks.options import check_common, write_report
from benchmarks.prepare import randomize_zero_params
from benchmarks.report import _device_name
from data.sample_data import reference_frames
from moditalker.config import load_config
from moditalker.device import bf16_supported, resolve_device
from moditalker.errors import UserError, cli_main, script_prog
from moditalker.fileio import repo_path
from moditalker.training.loop import PassBatches
from MToV.cache_latents import build_cache
from MToV.dataset import build_dataset
from MToV.diffusion import DDPM
from MToV.latents import CachedLatents, CachedWindowDataset, from_storage, open_cache, to_storage
from MToV.loading import build_ddpm, build_models
from MToV.train_diffusion import DEFAULTS, KEYS, LatentBatcher, make_optimizer

FRAMES_PRECISIONS = ("auto", "bf16", "fp32")
LATENT_STEPS = 3  # the cache path runs this many times --steps (its steps are short: more of them)


def write_tree(root: Path, n_videos: int, n_frames: int, size: int) -> None:
    """A synthetic HDTF tree: ``n_videos`` videos of ``n_frames`` JPEG frames (the astronaut face of
    :mod:`data.sample_data` under a slow nod, shifted per video) and 68 keypoints per frame."""
    frames = reference_frames(n_frames + n_videos, size)
    angle = 2 * np.pi * np.arange(68) / 68
    layout = np.stack([0.5 + 0.22 * np.cos(angle), 0.55 + 0.3 * np.sin(angle)], 1)
    layout[33] = (0.5, 0.6)  # the nose base: masked_x is black from this row down
    for v in range(n_videos):
        vid = f"SYN_{v:03d}"
        (root / "frames" / vid).mkdir(parents=True, exist_ok=True)
        kp_dir = root / "keypoints" / "non-face-centric" / "posed" / vid
        kp_dir.mkdir(parents=True, exist_ok=True)
        for k in range(n_frames):
            cv2.imwrite(str(root / "frames" / vid / f"{k:05d}.jpg"), frames[v + k][:, :, ::-1])
            shift = 0.02 * np.array([np.sin(0.3 * k + v), np.cos(0.2 * k)])
            np.save(kp_dir / f"{k:05d}.npy", ((layout + shift) * size).astype(np.float32))


def bench_config(tiny: bool, device: str, batch_size: int, workers: int, root: Path):
    overrides = [
        f"data.root={root}",
        "random_autoencoders=true",
        f"train.device={device}",
        f"train.batch_size={batch_size}",
        f"data.num_workers={workers}",
    ]
    path = repo_path("configs/mtov_tiny.yaml") if tiny else None
    return load_config(path, overrides, DEFAULTS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(
    batches, batcher, ddpm, opt, n: int, device, amp: torch.dtype | None, desc: str | None = None
) -> dict[str, float]:
    """``n`` training steps as the trainer runs them; mean seconds per step of data / encode / UNet, and
    the process's CPU seconds per step (``cpu``: steadier than wall time on a shared machine; the
    loader's worker processes are not in it)."""
    sums = {"data": 0.0, "encode": 0.0, "unet_step": 0.0}
    cpu0 = time.process_time()
    for _ in tqdm(range(n), desc=desc, disable=desc is None, leave=False):
        t0 = time.perf_counter()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        _sync(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            z, cond, image_cond = batcher(batch)
        _sync(device)
        t2 = time.perf_counter()
        loss, _ = ddpm(z, cond, image_cond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        for key, sec in zip(sums, (t1 - t0, t2 - t1, t3 - t2)):
            sums[key] += sec
    out = {k: v / max(n, 1) for k, v in sums.items()}
    out["total"] = sum(out.values())
    out["cpu"] = (time.process_time() - cpu0) / max(n, 1)
    return out


@torch.no_grad()
def window_losses(ddpm: DDPM, latents: tuple, t: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """The trainer's loss of each window alone (``DDPM.p_losses``) at timesteps ``t`` and ``noise``."""
    z, cond, image_cond = latents
    out = []
    for i in range(z.shape[0]):
        one = slice(i, i + 1)
        out.append(ddpm.p_losses(z[one], cond[one], image_cond[one], t[one], noise[one])[0])
    return torch.stack(out).double().cpu().numpy()


def run_benchmark(
    device: str = "auto",
    steps: int = 2,
    batch_size: int = 4,
    tiny: bool = False,
    workers: int = 2,
    frames_precision: str = "auto",
    warmup: int = 1,
    work_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Build the cache, compare the losses, time both paths; returns the report (see module doc)."""
    if steps < 1 or batch_size < 1 or warmup < 0 or workers < 0:
        raise UserError("--steps and --batch_size must be >= 1, --warmup and --workers >= 0")
    if frames_precision not in FRAMES_PRECISIONS:
        raise UserError(f"--frames_precision must be one of {', '.join(FRAMES_PRECISIONS)}")
    dev = resolve_device(device)
    temp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_training_") if temp else work_dir)
    try:
        return _run(dev, steps, batch_size, tiny, workers, frames_precision, warmup, work, seed, progress)
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)


def _run(dev, steps, batch_size, tiny, workers, frames_precision, warmup, work: Path, seed, progress) -> dict:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    def bar(desc: str) -> str | None:
        return desc if progress else None

    cfg = bench_config(tiny, str(dev), batch_size, workers, work / "hdtf")
    cfg.train.seed = seed
    t, size = int(cfg.autoencoder.ddconfig.timesteps), 64 if tiny else 256
    if not (work / "hdtf").is_dir():  # written beside, then renamed: a cut-short tree is never reused
        partial = work / "hdtf.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_tree(partial, max(batch_size, 2), t, size)
        os.replace(partial, work / "hdtf")
    t0 = time.perf_counter()
    built = build_cache(cfg, work / "cache", batch_size=batch_size, progress=progress)
    build_s = (time.perf_counter() - t0) / built["windows"] if built["built"] == built["videos"] else None

    set_seed(seed)
    ae_rgb, ae_ldmk, unet = build_models(cfg)  # seeded as the trainer and the builder build them
    cfg.data.latents = str(work / "cache")
    cache = open_cache(cfg, ae_rgb, ae_ldmk)  # the cache's settings check, as training runs it
    for ae in (ae_rgb, ae_ldmk):
        ae.to(dev).eval().requires_grad_(False)
    randomize_zero_params(unet, seed + 1)
    unet.diffusion_model.freeze_unused()
    ddpm = build_ddpm(unet, ae_rgb, cfg.diffusion).to(dev)
    initial = copy.deepcopy(unet.state_dict())
    trainable = [p for p in unet.parameters() if p.requires_grad]
    loader_kw = {
        "batch_size": batch_size,
        "shuffle": True,
        "drop_last": True,
        "num_workers": workers,
        "persistent_workers": workers > 0,
    }

    frames_ds = build_dataset(cfg.data, "train", KEYS, ae_rgb.timesteps, ae_rgb.res)
    frames_batches = iter(PassBatches(DataLoader(frames_ds, **loader_kw), seed))
    frames_batcher = LatentBatcher(ae_rgb, ae_ldmk)

    # 2. the same windows from the frames (fp32, as the trainer) and from the cache
    batch0 = next(frames_batches)
    windows = list(zip(batch0["id"], (int(s) for s in batch0["start"])))
    if progress:
        print("encoding the first batch in fp32 (the reference) ...", flush=True)
    t1 = time.perf_counter()
    ref_frames = frames_batcher({k: batch0[k].to(dev) for k in KEYS})
    _sync(dev)
    fp32_encode_s = time.perf_counter() - t1
    cached = [cache.window(vid, start) for vid, start in windows]
    stacked = {k: torch.stack([c[k] for c in cached]).to(dev) for k in cached[0]}
    ref_cache = CachedLatents()(stacked)
    rounded = {k: from_storage(to_storage(v, "bf16"), "bf16").to(dev) for k, v in stacked.items()}
    gen = torch.Generator().manual_seed(seed + 2)
    tt = torch.randint(0, ddpm.num_timesteps, (batch_size,), generator=gen).to(dev)
    noise = torch.randn(ref_cache[0].shape, generator=gen).to(dev)
    losses_f = window_losses(ddpm, ref_frames, tt, noise)
    losses_c = window_losses(ddpm, ref_cache, tt, noise)
    losses_b = window_losses(ddpm, CachedLatents()(rounded), tt, noise)

    # 3. warm-up of the UNet step, then each path from the same weights
    opt = make_optimizer(trainable, cfg.train)
    run_steps(iter([stacked]), CachedLatents(), ddpm, opt, 1, dev, None, bar("UNet warm-up"))
    amp = None
    if frames_precision == "bf16" or (frames_precision == "auto" and bf16_supported(dev)):
        amp = torch.bfloat16 if bf16_supported(dev) else None
    if dev.type == "cuda":  # the encoders' first calls in ``amp`` (bf16) load their kernels: not timed
        run_steps(frames_batches, frames_batcher, ddpm, opt, warmup, dev, amp, bar("frame-path warm-up"))
    unet.load_state_dict(initial)
    opt = make_optimizer(trainable, cfg.train)
    frames = run_steps(frames_batches, frames_batcher, ddpm, opt, steps, dev, amp, bar("frame-path steps"))
    unet.load_state_dict(initial)
    opt = make_optimizer(trainable, cfg.train)
    cache_ds = CachedWindowDataset(cache, "train", int(cfg.data.train_clips_per_video))
    cache_batches = iter(PassBatches(DataLoader(cache_ds, **loader_kw), seed))
    run_steps(cache_batches, CachedLatents(), ddpm, opt, warmup, dev, None, bar("cache-path warm-up"))
    latents = run_steps(
        cache_batches, CachedLatents(), ddpm, opt, LATENT_STEPS * steps, dev, None, bar("cache-path steps")
    )

    fp32_estimate = frames["data"] + fp32_encode_s + frames["unet_step"]
    return {
        "device": _device_name(dev),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "size": "tiny" if tiny else "full",
        "batch_size": batch_size,
        "steps": {"frames": steps, "latents": LATENT_STEPS * steps},
        "workers": workers,
        "frames_encoder_precision": "bf16" if amp is not None else "fp32",
        "frames_s_per_step": frames["total"],
        "latents_s_per_step": latents["total"],
        "speedup": frames["total"] / latents["total"],
        "frames_breakdown": {k: frames[k] for k in ("data", "encode", "unet_step")},
        "latents_breakdown": {k: latents[k] for k in ("data", "unet_step")},
        "frames_cpu_s_per_step": frames["cpu"],
        "latents_cpu_s_per_step": latents["cpu"],
        "speedup_cpu_seconds": frames["cpu"] / latents["cpu"],
        "latents_data_wait_fraction": latents["data"] / latents["total"],
        "frames_fp32_encode_s": fp32_encode_s,
        "frames_fp32_s_per_step_estimate": fp32_estimate,
        "speedup_vs_fp32_frames_estimate": fp32_estimate / latents["total"],
        "max_abs_loss_diff": float(np.abs(losses_f - losses_c).max()),
        "bf16_cache_max_abs_loss_diff": float(np.abs(losses_f - losses_b).max()),
        "reference_losses": [float(x) for x in losses_f],
        "cache_bytes_per_window": int(cache.manifest["bytes_per_window"]),
        "cache_build_s_per_window": build_s,
    }


def format_table(r: dict) -> str:
    fb, lb = r["frames_breakdown"], r["latents_breakdown"]
    rows = [
        f"MToV diffusion training step, {r['size']} size, batch {r['batch_size']}, {r['device']}",
        f"{'path':<34}{'s/step':>10}{'data':>10}{'encode':>10}{'UNet':>10}",
        f"{'frames (encoders ' + r['frames_encoder_precision'] + ')':<34}{r['frames_s_per_step']:>10.3f}"
        f"{fb['data']:>10.3f}{fb['encode']:>10.3f}{fb['unet_step']:>10.3f}",
        f"{'latent cache (fp32)':<34}{r['latents_s_per_step']:>10.3f}{lb['data']:>10.3f}{'-':>10}"
        f"{lb['unet_step']:>10.3f}",
        f"speedup {r['speedup']:.1f}x (vs fp32 frame encoders, estimated: "
        f"{r['speedup_vs_fp32_frames_estimate']:.1f}x); cache path waits for data "
        f"{100 * r['latents_data_wait_fraction']:.2f} % of a step",
        f"process CPU seconds per step: frames {r['frames_cpu_s_per_step']:.2f}, cache "
        f"{r['latents_cpu_s_per_step']:.2f} (ratio {r['speedup_cpu_seconds']:.1f}x)",
        f"max |loss(frames) - loss(cache)|: fp32 cache {r['max_abs_loss_diff']:.2e}, bf16 cache "
        f"{r['bf16_cache_max_abs_loss_diff']:.2e}; {r['cache_bytes_per_window'] / 1024:.1f} KiB per window",
    ]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=script_prog("python -m benchmarks.training"),
        description="Seconds per MToV diffusion training step: frame-based vs latent cache (random weights).",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N [auto]")
    p.add_argument("--steps", type=int, default=2, help="timed frame-path steps; the cache path runs 3x [2]")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps before timing: the cache path's (on a GPU the frame path's too) [1]",
    )
    p.add_argument("--batch_size", type=int, default=4, help="windows per step [4]")
    p.add_argument("--workers", type=int, default=2, help="data loader processes of both paths [2]")
    p.add_argument(
        "--frames_precision",
        default="auto",
        choices=FRAMES_PRECISIONS,
        help="frame-path encoders: auto = bf16 autocast where the device has bf16 units",
    )
    p.add_argument("--tiny", action="store_true", help="tiny networks (configs/mtov_tiny.yaml): a smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    p.add_argument("--work_dir", default=None, help="keep the synthetic tree and cache here [a temp folder]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_common(args)
    report = run_benchmark(
        args.device,
        args.steps,
        args.batch_size,
        args.tiny,
        args.workers,
        args.frames_precision,
        args.warmup,
        args.work_dir,
        args.seed,
        not args.no_progress,
    )
    print(format_table(report))
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    cli_main(main)
