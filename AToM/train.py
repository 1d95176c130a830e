"""Train AToM: ``python -m AToM.train --config configs/atom.yaml [key=value ...]``.

Runs under ``accelerate`` (CPU, one GPU, ``accelerate launch`` for several GPUs or nodes; fp16/bf16 via
``train.mixed_precision``). Adan (``adan-pytorch``), EMA every step, checkpoints in the official layout
(``model_state_dict``, ``ema_state_dict``, ``optimizer_state_dict``, plus ``step`` and ``config``),
a periodic validation loss (model and EMA). The run folder, the resume from ``{out_dir}/state``
(exact: the position in the epoch and every RNG state), ``config.yaml``, tensorboard (``tb/``),
``metrics.jsonl`` and the progress bar are the trainer skeleton's (:mod:`moditalker.training.loop`);
a run folder of the older layout (``checkpoints/step_N.pt``, no ``state/``) resumes from its newest
checkpoint.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from AToM.common import DEFAULT_CONFIG, build_diffusion, load_weights, read_checkpoint
from AToM.dataset import WindowDataset, open_sources
from AToM.diffusion import GaussianDiffusion
from moditalker.config import load_config
from moditalker.device import is_main_rank, resolve_device
from moditalker.errors import UserError, cli_main, script_prog
from moditalker.fileio import repo_path, torch_save
from moditalker.training.accelerator import check_train_loader, start_accelerator
from moditalker.training.bad_items import BadItems, SkipUnreadable, check_items
from moditalker.training.ema import ModelEMA
from moditalker.training.loop import EpochBatches, TrainingRun, check_finite_loss
from moditalker.training.options import add_run_arguments
from moditalker.training.rng import rng_state
from moditalker.training.run_state import find_state

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


def train(cfg: DictConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """Train until ``train.max_steps``; returns the path of the last checkpoint written."""
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    tc, dc = cfg.train, cfg.data
    out_dir, resume = Path(tc.out_dir), str(tc.resume)
    ckpt_path = checkpoint_to_resume(out_dir, resume)
    own = ckpt_path is not None and ckpt_path.resolve().parent == (out_dir / "checkpoints").resolve()
    if ckpt_path is not None and not own and not overwrite and out_dir.exists() and any(out_dir.iterdir()):
        # another run's checkpoint continues here: this folder's step checkpoints would be pruned
        raise UserError(
            f"train.resume={ckpt_path} continues into {out_dir}, which already holds files; choose a new "
            "or empty out_dir, or pass --overwrite"
        )
    run = TrainingRun(out_dir, resume != "never", overwrite, resume_from_file=ckpt_path is not None)
    # unused official modules and randomly dropped null embeddings get no gradient
    unused = DistributedDataParallelKwargs(find_unused_parameters=True)
    acc = start_accelerator(
        "AToM train",
        resolve_device(str(tc.device)),
        mixed_precision=tc.mixed_precision,
        cpu=bool(tc.cpu),
        kwargs_handlers=[unused],
    )
    set_seed(int(tc.seed))
    diffusion, opt, ema, ckpt = _build(cfg, ckpt_path)
    windows, loader, val_loader = _loaders(cfg, acc.num_processes)
    diffusion, opt, loader = acc.prepare(diffusion, opt, loader)
    check_train_loader(loader, len(windows), int(tc.batch_size), acc.num_processes, what="windows")
    ema.model.to(acc.device)
    acc.register_for_checkpointing(ema.model)
    raw: GaussianDiffusion = acc.unwrap_model(diffusion)
    diffusion_kwargs = OmegaConf.to_container(cfg.diffusion, resolve=True)
    ema_diffusion = GaussianDiffusion(ema.model, **diffusion_kwargs).to(acc.device)
    run.open(acc, cfg, BadItems(float(dc.max_bad_items), len(windows), windows.name))
    if ckpt:
        position = ckpt.get("data_position") or {}
        # the file holds rank 0's RNG states; another rank restoring them would draw rank 0's noise
        rng = position.get("rng") if acc.is_main_process else None
        run.continue_at(int(ckpt.get("step", 0)), {"position": position}, rng, ckpt_path)
    # exact resume: each epoch's shuffle and windows are functions of (seed, epoch)
    stream = EpochBatches(loader, int(tc.seed), lambda epoch: setattr(windows, "epoch", epoch),
                          run.info.get("position"), run.resumed_rng, rank=acc.process_index)  # fmt: skip
    batches = run.counted(stream)
    last_path = ckpt_path

    def step_fn(step: int) -> dict:
        res, face, hub, mask = batch_to_inputs(next(batches))
        with acc.autocast():
            loss, extras = diffusion(res, None, face, hub, mask=mask)
        # the three scalars in one copy: on a GPU each .item() waits for the device
        values = torch.stack([v.detach().float() for v in (loss, extras["loss"], extras["v_loss"])]).tolist()
        check_finite_loss(values[0], step + 1)  # 1-based, as the progress bar and the saved steps
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(raw.model)
        return dict(zip(("loss", "loss_x0", "loss_velocity"), values))

    def validate(step: int) -> dict:
        n = int(tc.val_batches)
        vl, vle = (validation_loss(d, val_loader, n, acc.device) for d in (raw, ema_diffusion))
        acc.print(f"step {step}: val loss {vl:.4f} (EMA {vle:.4f})")
        return {"val_loss": vl, "val_loss_ema": vle}

    def write_checkpoint(step: int) -> dict:
        nonlocal last_path
        acc.wait_for_everyone()
        position = stream.position()
        if acc.is_main_process:
            where = {**position, "rng": rng_state()}
            last_path = save_checkpoint(out_dir, step, raw, ema, opt, cfg, int(tc.keep_checkpoints), where)
        return {"position": position}

    diffusion.train()
    run.loop(step_fn, validate, max_steps=int(tc.max_steps), log_every=int(tc.log_every),
             val_every=int(tc.val_every), save_every=int(tc.save_every), desc="AToM train", progress=progress,
             train_records=True, on_save=write_checkpoint)  # fmt: skip
    run.close()
    acc.wait_for_everyone()
    return last_path if last_path is not None else latest_checkpoint(out_dir)


def _loaders(cfg: DictConfig, num_processes: int) -> tuple[WindowDataset, DataLoader, DataLoader]:
    """(training windows, their loader, the validation loader); unreadable items are skipped."""
    windows, val_ds = open_windows(cfg)
    bs = int(cfg.train.batch_size)
    # new workers each epoch: they must see the dataset's epoch number
    drop_last, workers = len(windows) >= bs * num_processes, int(cfg.data.num_workers)
    loader = DataLoader(
        SkipUnreadable(windows, windows.name), bs, shuffle=True, drop_last=drop_last, num_workers=workers
    )
    return windows, loader, DataLoader(SkipUnreadable(val_ds, val_ds.name), bs, shuffle=False, num_workers=0)


def checkpoint_to_resume(out_dir: Path, resume: str) -> Path | None:
    """The checkpoint file a run resumes from instead of ``out_dir/state``: ``train.resume=PATH``, or
    with ``auto`` the newest ``checkpoints/step_*.pt`` of a run folder written before the state
    existed (no ``state/`` beside them)."""
    if resume not in ("auto", "never"):
        return Path(resume)
    if resume == "auto" and find_state(out_dir) is None:
        return latest_checkpoint(out_dir)
    return None


def _build(cfg: DictConfig, ckpt_path: Path | None) -> tuple:
    """(diffusion model, Adan, EMA, the checkpoint resumed from or {}): weights, EMA and optimizer
    state from ``ckpt_path`` when given."""
    from adan_pytorch import Adan

    tc = cfg.train
    diffusion = build_diffusion(cfg)
    betas = tuple(float(b) for b in tc.adan_betas)
    opt = Adan(
        diffusion.model.parameters(), lr=float(tc.lr), betas=betas, weight_decay=float(tc.weight_decay)
    )
    ema = ModelEMA(diffusion.model, float(tc.ema_decay))
    if ckpt_path is None:
        return diffusion, opt, ema, {}
    return diffusion, opt, ema, _load_checkpoint(ckpt_path, diffusion, ema, opt)


def _load_checkpoint(path: Path, diffusion, ema: ModelEMA, opt) -> dict:
    """Weights, EMA and optimizer state from a step checkpoint; returns it (step, data_position)."""
    ckpt = read_checkpoint(path)
    load_weights(diffusion.model, ckpt["model_state_dict"], path, "model_state_dict")
    load_weights(ema.model, ckpt.get("ema_state_dict", ckpt["model_state_dict"]), path, "ema_state_dict")
    if "optimizer_state_dict" in ckpt:
        opt.load_state_dict(ckpt["optimizer_state_dict"])
    return ckpt


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
    path = train(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    if is_main_rank():
        print(f"last checkpoint: {path}")


if __name__ == "__main__":
    cli_main(main)
