"""Train AToM: ``python -m AToM.train --config configs/atom.yaml [key=value ...]``.

Runs under ``accelerate`` (CPU, one GPU, ``accelerate launch`` for several GPUs or nodes; fp16/bf16 via
``train.mixed_precision``). Adan (``adan-pytorch``), EMA every step, checkpoints in the official layout
(``model_state_dict``, ``ema_state_dict``, ``optimizer_state_dict``, plus ``step`` and ``config``),
automatic resume from the latest checkpoint in ``train.out_dir``, tensorboard logs in
``out_dir/tb``, a progress bar and a periodic validation loss (model and EMA).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from AToM.common import DEFAULT_CONFIG, build_diffusion, load_weights, read_checkpoint
from AToM.dataset import WindowDataset, open_sources
from AToM.diffusion import GaussianDiffusion
from moditalker.config import load_config, save_config
from moditalker.device import is_main_rank, resolve_device
from moditalker.errors import UserError, cli_main, script_prog
from moditalker.fileio import repo_path, torch_save
from moditalker.training.accelerator import check_train_loader, start_accelerator
from moditalker.training.bad_items import BadItems, SkipUnreadable, check_items
from moditalker.training.ema import ModelEMA
from moditalker.training.options import add_run_arguments
from moditalker.training.rng import derived_seed, rng_state, seed_everything, set_rng_state

TRAIN_DEFAULTS: dict = {
    **DEFAULT_CONFIG,
    "data": {
        "root": "data/train/lrs3",
        "format": "auto",
        "min_frames": 8,
        "val_every": 100,
        "num_workers": 4,
        "max_bad_items": 0.01,  # unreadable clips skipped: a fraction when < 1, else a count
    },
    "train": {
        "out_dir": "runs/atom",
        "batch_size": 64,
        "lr": 4e-4,
        "weight_decay": 0.02,
        "adan_betas": [0.02, 0.08, 0.01],
        "ema_decay": 0.9999,
        "max_steps": 1_000_000,
        "save_every": 2000,
        "val_every": 2000,
        "val_batches": 8,
        "log_every": 50,
        "keep_checkpoints": 3,
        "mixed_precision": "no",
        "seed": 0,
        "resume": "auto",
        "cpu": False,
        "device": "auto",  # auto | cpu | cuda (--device); accelerate places the ranks on the GPUs
    },
}


def checkpoint_step(path: Path) -> int:
    m = re.search(r"step_(\d+)\.pt$", path.name)
    return int(m.group(1)) if m else -1


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint with the highest step in ``out_dir/checkpoints``, or None."""
    ckpts = sorted((out_dir / "checkpoints").glob("step_*.pt"), key=checkpoint_step)
    return ckpts[-1] if ckpts else None


def batch_to_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual, face, hubert, mask): the reference is the window's first frame, repeated."""
    x = batch["x"]
    face = x[:, :1].expand_as(x)
    return x - face, face, batch["hubert"], batch["mask"]


@torch.no_grad()
def validation_loss(diffusion: GaussianDiffusion, loader: DataLoader, n_batches: int, device) -> float:
    """Deterministic validation loss: fixed t and noise, conditions kept (drop prob 0)."""
    gen = torch.Generator().manual_seed(1234)
    old, diffusion.cond_drop_prob = diffusion.cond_drop_prob, 0.0
    was_training = diffusion.training
    diffusion.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            res, face, hub, mask = (t.to(device) for t in batch_to_inputs(batch))
            t = torch.randint(0, diffusion.n_timestep, (res.shape[0],), generator=gen).to(device)
            noise = torch.randn(res.shape, generator=gen).to(device)
            loss, _ = diffusion.p_losses(res, None, face, hub, t, noise=noise, mask=mask)
            total, count = total + loss.item(), count + 1
    finally:
        diffusion.cond_drop_prob = old
        diffusion.train(was_training)
    return total / max(count, 1)


def open_windows(cfg: DictConfig) -> tuple[WindowDataset, WindowDataset]:
    """The training windows (random, seeded by ``train.seed``) and the fixed validation windows."""
    dc = cfg.data
    train_src, val_src = open_sources(dc.root, dc.format, int(dc.val_every), float(dc.max_bad_items))
    horizon = int(cfg.diffusion.horizon)
    train = WindowDataset(train_src, horizon, int(dc.min_frames), seed=int(cfg.train.seed))
    width, want = train.feature_width(), int(cfg.model.cond_feature_dim)
    if width != want:
        raise UserError(
            f"the clips in {dc.root} hold {width}-wide HuBERT features but model.cond_feature_dim is "
            f"{want}: make the data with that width (data.preprocess lrs3 --random_weights --hubert_dim "
            f"{want}) or set model.cond_feature_dim={width}"
        )
    return train, WindowDataset(val_src, horizon, int(dc.min_frames), deterministic=True)


def check_data(cfg: DictConfig) -> int:
    """``--check``: read every clip and window of both splits without training; prints one line per
    unreadable item and returns how many there were."""
    cfg = OmegaConf.merge(cfg, {"data": {"max_bad_items": 10**12}})  # list them all, stop at none
    train, val = open_windows(cfg)
    lines = train.source.bad_files + ([] if val.source is train.source else val.source.bad_files)
    for ds in (train, val) if val.source is not train.source else (train,):
        lines += check_items(ds, ds.name)
    for line in dict.fromkeys(lines):
        print(f"unreadable: {line}")
    print(f"checked {len(train)} training windows of {len(train.source)} clips: {len(lines)} unreadable")
    return len(lines)


def train(cfg: DictConfig, progress: bool = True) -> Path:
    """Train until ``train.max_steps``; returns the path of the last checkpoint written."""
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from adan_pytorch import Adan
    from torch.utils.tensorboard import SummaryWriter

    tc, dc = cfg.train, cfg.data
    acc = start_accelerator(
        "AToM train",
        mixed_precision=tc.mixed_precision,
        cpu=bool(tc.cpu),
        # unused official modules and randomly dropped null embeddings get no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(int(tc.seed))
    out_dir = Path(tc.out_dir)
    diffusion = build_diffusion(cfg)
    opt = Adan(
        diffusion.model.parameters(),
        lr=float(tc.lr),
        betas=tuple(float(b) for b in tc.adan_betas),
        weight_decay=float(tc.weight_decay),
    )
    ema = ModelEMA(diffusion.model, float(tc.ema_decay))
    step = 0
    position: dict = {}  # where in the data the checkpoint stopped, and the RNG states then
    resume = str(tc.resume)
    ckpt_path = (
        None if resume == "never" else latest_checkpoint(out_dir) if resume == "auto" else Path(resume)
    )
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path)
        load_weights(diffusion.model, ckpt["model_state_dict"], ckpt_path, "model_state_dict")
        ema_sd = ckpt.get("ema_state_dict", ckpt["model_state_dict"])
        load_weights(ema.model, ema_sd, ckpt_path, "ema_state_dict")
        if "optimizer_state_dict" in ckpt:
            opt.load_state_dict(ckpt["optimizer_state_dict"])
        step = int(ckpt.get("step", 0))
        position = ckpt.get("data_position") or {}
        acc.print(f"resumed from {ckpt_path} at step {step}")

    windows, val_ds = open_windows(cfg)
    bad_items = BadItems(float(dc.max_bad_items), len(windows), windows.name)
    train_ds = SkipUnreadable(windows, windows.name)
    bs = int(tc.batch_size)
    nw = int(dc.num_workers)
    loader = DataLoader(
        train_ds,
        bs,
        shuffle=True,
        drop_last=len(train_ds) >= bs * acc.num_processes,
        num_workers=nw,  # new workers each epoch: they must see the dataset's epoch number
    )
    val_loader = DataLoader(SkipUnreadable(val_ds, val_ds.name), bs, shuffle=False, num_workers=0)
    diffusion, opt, loader = acc.prepare(diffusion, opt, loader)
    check_train_loader(loader, len(train_ds), bs, acc.num_processes, what="windows")
    ema.model.to(acc.device)
    raw: GaussianDiffusion = acc.unwrap_model(diffusion)
    ema_diffusion = GaussianDiffusion(ema.model, **OmegaConf.to_container(cfg.diffusion, resolve=True)).to(
        acc.device
    )

    writer = None
    metrics = None
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        writer = SummaryWriter(str(out_dir / "tb"))
        metrics = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed at the end

    def log(**kw) -> None:
        if metrics is not None:
            metrics.write(json.dumps(kw) + "\n")
            metrics.flush()

    max_steps = int(tc.max_steps)
    last_path = ckpt_path
    bar = tqdm(
        total=max_steps, initial=step, desc="AToM train", disable=not (progress and acc.is_local_main_process)
    )
    diffusion.train()
    running, n_running = 0.0, 0
    # Exact resume: each epoch's shuffle and windows are functions of (seed, epoch); a resumed run
    # re-enters its epoch, passes over the batches already trained, then restores the RNG states of
    # the moment the checkpoint was written (noise, timesteps, condition dropout continue as before).
    epoch, skip, saved_rng = int(position.get("epoch", 0)), int(position.get("batch", 0)), position.get("rng")
    while step < max_steps:
        seed_everything(derived_seed(int(tc.seed), epoch))
        windows.epoch = epoch
        for batch_index, batch in enumerate(loader):
            if batch_index < skip:
                continue
            if saved_rng is not None:
                set_rng_state(saved_rng)
                saved_rng = None
            bad_items.note_batch(batch)
            res, face, hub, mask = batch_to_inputs(batch)
            with acc.autocast():
                loss, extras = diffusion(res, None, face, hub, mask=mask)
            if not torch.isfinite(loss):
                raise UserError(f"training loss became {loss.item()} at step {step}; lower train.lr")
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(raw.model)
            step += 1
            running, n_running = running + loss.item(), n_running + 1
            bar.update(1)
            if step % int(tc.log_every) == 0 or step == max_steps:
                avg = running / n_running
                bar.set_postfix(loss=f"{avg:.4f}")
                if writer:
                    writer.add_scalar("train/loss", avg, step)
                    writer.add_scalar("train/loss_x0", extras["loss"].item(), step)
                    writer.add_scalar("train/loss_velocity", extras["v_loss"].item(), step)
                log(step=step, train_loss=avg, skipped_items=len(bad_items))
                running, n_running = 0.0, 0
            if step % int(tc.val_every) == 0 or step == max_steps:
                vl = validation_loss(raw, val_loader, int(tc.val_batches), acc.device)
                vle = validation_loss(ema_diffusion, val_loader, int(tc.val_batches), acc.device)
                if writer:
                    writer.add_scalar("val/loss", vl, step)
                    writer.add_scalar("val/loss_ema", vle, step)
                log(step=step, val_loss=vl, val_loss_ema=vle)
                acc.print(f"step {step}: val loss {vl:.4f} (EMA {vle:.4f})")
            if step % int(tc.save_every) == 0 or step == max_steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    where = {"epoch": epoch, "batch": batch_index + 1, "rng": rng_state()}
                    last_path = save_checkpoint(
                        out_dir, step, raw, ema, opt, cfg, int(tc.keep_checkpoints), where
                    )
            if step >= max_steps:
                break
        epoch, skip, saved_rng = epoch + 1, 0, None
    bar.close()
    if writer:
        writer.close()
    if metrics is not None:
        metrics.close()
    acc.wait_for_everyone()
    return last_path if last_path is not None else latest_checkpoint(out_dir)


def save_checkpoint(
    out_dir: Path,
    step: int,
    raw,
    ema: ModelEMA,
    opt,
    cfg: DictConfig,
    keep: int,
    position: dict | None = None,
) -> Path:
    """Official layout + ``step``, ``config`` and ``data_position`` (epoch, batches done in it, RNG
    states: what an exact resume needs); keeps the newest ``keep`` checkpoints."""
    path = out_dir / "checkpoints" / f"step_{step:08d}.pt"
    torch_save(
        {
            "model_state_dict": raw.model.state_dict(),
            "ema_state_dict": ema.model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "step": step,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "data_position": position,
        },
        path,
    )
    old = sorted((out_dir / "checkpoints").glob("step_*.pt"), key=checkpoint_step)[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog=script_prog("python -m AToM.train"),
        description="Train AToM (audio -> landmark motion diffusion).",
    )
    add_run_arguments(ap, "configs/atom.yaml")  # the options every trainer shares
    ap.add_argument("--cpu", action="store_true", help="same as --device cpu")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(repo_path(args.config), args.overrides, TRAIN_DEFAULTS, strict=True)
    if args.check:
        if check_data(cfg):
            raise UserError("some training items are unreadable (listed above)")
        return
    if args.out_dir is not None:
        cfg.train.out_dir = args.out_dir
    if args.cpu or args.device is not None:
        cfg.train.device = "cpu" if args.cpu else args.device
    resolve_device(str(cfg.train.device))  # an unknown or absent device is one line, before any work
    cfg.train.cpu = bool(cfg.train.cpu) or str(cfg.train.device) == "cpu"
    if args.no_resume:
        if not args.overwrite:
            raise UserError("--no_resume restarts the run in place; add --overwrite to confirm")
        cfg.train.resume = "never"
    if int(cfg.train.max_steps) <= 0 or int(cfg.train.batch_size) <= 0:
        raise UserError("train.max_steps and train.batch_size must be positive")
    if not math.isfinite(float(cfg.train.lr)) or float(cfg.train.lr) <= 0:
        raise UserError("train.lr must be a positive number")
    path = train(cfg, progress=not args.no_progress)
    if is_main_rank():
        print(f"last checkpoint: {path}")


if __name__ == "__main__":
    cli_main(main)
