"""Train the MToV latent diffusion UNet: ``python -m MToV.train_diffusion --config ... [key=value ...]``.

Per step (as the original ``latentDDPM`` trainer), with both autoencoders frozen:

* ``z = E_rgb.extract(x)``, ``masked_z = E_rgb.extract(masked_x)``, ``ref = E_rgb.extract(x_ref)``
  (one batched call), ``z_l = E_ldmk.extract(x_l)``;
* loss ``|| eps - UNet(q_sample(z, t, eps), cat(z_l, masked_z), ref[..., :r*r], t) ||^2`` at a
  uniform t (``diffusion.loss_type: l1`` is the documented option: the original YAML said l1 but
  its trainer always used l2); no condition dropout (the original has none);
* AdamW (lr 1e-4, weight decay 0.01, constant lr, no clipping; fused kernel), EMA (decay 0.9999
  with warm-up) updated every ``train.ema_every`` = 25 steps;
* a NaN or infinite training loss stops the run with one ``error:`` line (exit 2), as AToM's does.

``data.latents=DIR`` trains from a latent cache (:mod:`MToV.cache_latents`) instead: the same split,
the same window draw (stride 1: the very windows this path draws), the same UNet step, no encoder
run; a cache built from other autoencoders or data settings is refused. ``train.amp: bf16`` runs the
frame path's encoders under bf16 autocast where the device has bf16 units.

``accelerate`` runs it on CPU, one GPU or ``accelerate launch`` multi-GPU. Resumable: ``{out_dir}/state``
holds UNet, optimizer, EMA, RNG states and the step; rerunning the same command continues.

Outputs in ``out_dir``: ``config.yaml``; ``diffusion_model.pth`` (EMA weights, DiffusionWrapper
state_dict: the file ``MToV.sample`` loads), ``model_last.pth`` (raw weights), ``metrics.jsonl``
(validation loss at fixed t and noise), ``tb/`` (tensorboard), ``state/``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from moditalker.config import load_config
from moditalker.device import bf16_supported, resolve_device
from moditalker.errors import UserError, cli_main, script_prog
from moditalker.fileio import repo_path, torch_save
from moditalker.training.accelerator import (
    check_train_loader,
    start_accelerator,
    train_val_loaders,
)
from moditalker.training.bad_items import BadItems
from moditalker.training.ema import LitEMA
from moditalker.training.loop import PassBatches, TrainingRun, check_finite_loss
from moditalker.training.options import add_run_arguments, apply_run_arguments, print_summary
from moditalker.training.run_state import check_inputs_are_not_outputs
from MToV.dataset import build_dataset, check_data, data_defaults
from MToV.diffusion import DDPM
from MToV.latents import CachedLatents, CachedWindowDataset, open_cache
from MToV.loading import MODEL_DEFAULTS, build_ddpm, build_models, load_unet_weights
from MToV.models.autoencoder import load_autoencoder_weights

DEFAULTS: dict = OmegaConf.to_container(
    OmegaConf.merge(
        OmegaConf.create(MODEL_DEFAULTS),
        {
            "out_dir": "runs/mtov_diffusion",
            "random_autoencoders": False,  # tests / smoke runs only: frozen random AEs, no checkpoints
            "init_unet": None,  # optional warm start of the UNet (DiffusionWrapper state_dict)
            # data.latents: a latent cache folder (MToV.cache_latents) to train from instead of the frames
            "data": {**data_defaults(max_val_clips=16), "latents": None},
            "train": {
                "lr": 1e-4,
                "betas": [0.9, 0.999],
                "weight_decay": 0.01,
                "batch_size": 10,
                "max_steps": 200_000,
                "ema_decay": 0.9999,
                "ema_every": 25,
                "amp": False,  # frozen encoders only: true/fp16 = fp16 autocast on CUDA; bf16 where supported
                "seed": 0,
                "log_every": 50,
                "save_every": 1000,
                "device": "auto",
            },
        },
    )
)

KEYS = ("x", "x_ref", "x_l", "masked_x")
#: the way out of a NaN / infinite training loss (the run stops: it would train on to NaN weights)
NON_FINITE_HINT = (
    "lower train.lr, or check the training data (a latent cache of data.latents built from a diverged "
    "autoencoder holds non-finite latents: build it again)"
)


class LatentBatcher:
    """Frozen autoencoders -> (z, cond, image_cond) latents for a dataset batch (no grad)."""

    keys = KEYS

    def __init__(self, ae_rgb, ae_ldmk) -> None:
        self.ae_rgb, self.ae_ldmk = ae_rgb, ae_ldmk
        self.n_xy = ae_rgb.r**2

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, masked, ref = batch["x"], batch["masked_x"], batch["x_ref"]
        b = x.shape[0]
        # x_ref is one frame repeated: encoding it costs a clip like the others, so batch all three
        z, masked_z, ref_z = self.ae_rgb.extract(torch.cat([x, masked, ref])).float().split(b)
        z_l = self.ae_ldmk.extract(batch["x_l"]).float()
        return z, torch.cat([z_l, masked_z], dim=1), ref_z[:, :, : self.n_xy]


@torch.no_grad()
def validation_loss(ddpm: DDPM, batcher, loader: DataLoader, device, max_clips: int) -> float:
    """Mean eps loss on held-out clips at fixed timesteps and noise (comparable across steps);
    ``batcher``: a :class:`LatentBatcher` (frames) or :class:`MToV.latents.CachedLatents` (cache)."""
    g = torch.Generator().manual_seed(1234)
    was_training = ddpm.training
    ddpm.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k in batcher.keys}
        z, cond, image_cond = batcher(batch)
        t = torch.randint(0, ddpm.num_timesteps, (z.shape[0],), generator=g).to(device)
        noise = torch.randn(z.shape, generator=g).to(device)
        loss, _ = ddpm.p_losses(z, cond, image_cond, t, noise=noise)
        total += float(loss) * z.shape[0]
        count += z.shape[0]
        if count >= max_clips:
            break
    ddpm.train(was_training)
    return total / max(count, 1)


def make_optimizer(params, tc) -> torch.optim.AdamW:
    """The trainer's AdamW, as one fused kernel per step (CPU and CUDA): the same update as the
    per-parameter loop, several times faster for the UNet's 130 M parameters on a CPU."""
    return torch.optim.AdamW(
        params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, fused=True
    )


def encoder_autocast(amp, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> the autocast dtype of the frozen encoders: false = none (fp32); true or fp16 =
    fp16 on CUDA (none elsewhere, as before); bf16 = bf16 where the device has bf16 units, else none."""
    if amp in (False, None, "false", "none", "fp32"):
        return None
    if amp in (True, "true", "fp16"):
        return torch.float16 if device.type == "cuda" else None
    if amp == "bf16":
        return torch.bfloat16 if bf16_supported(device) else None
    raise UserError(f"train.amp must be false, true, fp16 or bf16, got {amp!r}")


def train(cfg: DictConfig, resume: bool = True, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or continue) diffusion training; returns ``{"step", "history", "train_losses"}``."""
    from accelerate.utils import set_seed

    ck = cfg.checkpoints
    inputs = {"checkpoints.ae_rgb": ck.ae_rgb, "checkpoints.ae_ldmk": ck.ae_ldmk, "init_unet": cfg.init_unet}
    check_inputs_are_not_outputs(
        Path(cfg.out_dir), {k: repo_path(v) if v else None for k, v in inputs.items()}
    )
    run = TrainingRun(cfg.out_dir, resume, overwrite)
    if cfg.diffusion.loss_type not in ("l1", "l2"):
        raise UserError(f"diffusion.loss_type must be l1 or l2, got {cfg.diffusion.loss_type!r}")
    tc, data_cfg = cfg.train, cfg.data
    device = resolve_device(tc.device)
    accelerator = start_accelerator("MToV diffusion train", device, cpu=device.type == "cpu")
    set_seed(int(tc.seed))

    ae_rgb, ae_ldmk, ddpm, ema, opt, cache = _build(cfg, not run.resuming, accelerator.device)
    train_ds, val_ds, batcher = _datasets(cfg, cache, ae_rgb, ae_ldmk, accelerator)
    train_loader, val_loader = train_val_loaders(
        train_ds, val_ds, int(tc.batch_size), int(data_cfg.num_workers), accelerator.num_processes
    )
    ddpm, opt, train_loader = accelerator.prepare(ddpm, opt, train_loader)
    check_train_loader(train_loader, len(train_ds), int(tc.batch_size), accelerator.num_processes)
    accelerator.register_for_checkpointing(ema)
    raw_ddpm = accelerator.unwrap_model(ddpm)
    amp_dtype = encoder_autocast(tc.amp, accelerator.device)
    bad = BadItems(float(data_cfg.max_bad_items), len(train_ds), train_ds.name)
    info = run.open(accelerator, cfg, bad, seed=int(tc.seed))
    # exact resume in the middle of a pass over the windows
    stream = PassBatches(train_loader, int(tc.seed), info.get("data_pass"), run.resumed_rng)
    batches = run.counted(stream)
    train_losses: list[float] = []

    def step_fn(step: int) -> dict:
        with torch.autocast(
            accelerator.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            z, cond, image_cond = batcher(next(batches))
        loss, _ = ddpm(z, cond, image_cond)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())  # the step's one sync, after the update is queued
        check_finite_loss(value, step + 1, NON_FINITE_HINT)  # before the EMA takes the weights in
        if (step + 1) % int(tc.ema_every) == 0:
            ema.update(raw_ddpm.model)
        train_losses.append(value)
        return {"loss": value}

    def validate(step: int) -> dict | None:
        if not run.main:
            return None
        max_clips = int(data_cfg.max_val_clips)
        return {"val_loss": validation_loss(raw_ddpm, batcher, val_loader, accelerator.device, max_clips)}

    def write_models(step: int, record: dict | None) -> None:
        if run.main:
            torch_save(ema.averaged_state_dict(raw_ddpm.model), run.out_dir / "diffusion_model.pth")
            torch_save({k: v.detach().cpu() for k, v in raw_ddpm.model.state_dict().items()},
                       run.out_dir / "model_last.pth")  # fmt: skip

    ddpm.train()
    every = int(tc.save_every)  # validation, model files and state together
    step = run.loop(step_fn, validate, max_steps=int(tc.max_steps), log_every=int(tc.log_every),
                    val_every=every, save_every=every, desc="MToV diffusion", progress=progress,
                    after_validation=write_models,
                    on_save=lambda step: {"data_pass": stream.record()})  # fmt: skip
    run.close()
    return {"step": step, "history": run.history, "train_losses": train_losses,
            "num_processes": accelerator.num_processes}  # fmt: skip


def _build(cfg: DictConfig, initialise: bool, device: torch.device) -> tuple:
    """(RGB and landmark autoencoders, DDPM around the UNet, its EMA, the optimizer, the latent cache
    or None): the autoencoders frozen on ``device`` (not loaded when training from a cache); a new
    run (``initialise``) starts the UNet from ``init_unet`` when set."""
    ae_rgb, ae_ldmk, unet = build_models(cfg)
    cache = open_cache(cfg, ae_rgb, ae_ldmk) if cfg.data.get("latents") else None
    if cache is None and not cfg.random_autoencoders:
        ck = cfg.checkpoints
        load_autoencoder_weights(ae_rgb, repo_path(ck.ae_rgb), "MToV RGB autoencoder")
        load_autoencoder_weights(ae_ldmk, repo_path(ck.ae_ldmk), "MToV landmark autoencoder")
    if initialise and cfg.init_unet:
        load_unet_weights(unet, cfg.init_unet)
    for ae in (ae_rgb, ae_ldmk) if cache is None else ():  # training from the cache never runs them
        ae.to(device).eval().requires_grad_(False)
    ddpm = build_ddpm(unet, ae_rgb, cfg.diffusion, loss_type=cfg.diffusion.loss_type)
    unet.diffusion_model.freeze_unused()  # output_bg_*: in the checkpoint, never run
    ema = LitEMA(unet, decay=float(cfg.train.ema_decay)).to(device)
    opt = make_optimizer([p for p in unet.parameters() if p.requires_grad], cfg.train)
    return ae_rgb, ae_ldmk, ddpm, ema, opt, cache


def _datasets(cfg, cache, ae_rgb, ae_ldmk, accelerator) -> tuple:
    """(training set, validation set, batcher): the frame clips and the frozen encoders, or the
    windows of a latent cache."""
    data_cfg = cfg.data
    if cache is None:
        timesteps, resolution = ae_rgb.timesteps, ae_rgb.res
        train_ds = build_dataset(data_cfg, "train", KEYS, timesteps, resolution)
        val_ds = build_dataset(data_cfg, "test", KEYS, timesteps, resolution)
        return train_ds, val_ds, LatentBatcher(ae_rgb, ae_ldmk)
    train_ds = CachedWindowDataset(cache, "train", int(data_cfg.train_clips_per_video))
    val_ds = CachedWindowDataset(cache, "test", int(data_cfg.val_clips_per_video))
    accelerator.print(f"training from the latent cache {cache.root} ({cache.dtype}, stride {cache.stride})")
    return train_ds, val_ds, CachedLatents()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=script_prog("python -m MToV.train_diffusion"),
        description="Train the MToV tri-plane latent diffusion UNet (frozen autoencoders; resumable).",
    )
    add_run_arguments(p, "configs/mtov_diffusion.yaml")
    p.add_argument("--ae_rgb", default=None, help="RGB autoencoder checkpoint (checkpoints.ae_rgb)")
    p.add_argument("--ae_ldmk", default=None, help="landmark autoencoder checkpoint (checkpoints.ae_ldmk)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(repo_path(args.config), args.overrides, DEFAULTS, strict=True)
    if args.ae_rgb is not None:
        cfg.checkpoints.ae_rgb = args.ae_rgb
    if args.ae_ldmk is not None:
        cfg.checkpoints.ae_ldmk = args.ae_ldmk
    apply_run_arguments(cfg, args)
    if cfg.data.root is None and not cfg.data.get("latents"):
        raise UserError(
            "set data.root=/path/to/HDTF (a folder with frames/ and keypoints/) or data.latents=DIR "
            "(a latent cache of scripts/cache_mtov_latents.sh)"
        )
    if args.check:
        dd = cfg.autoencoder.ddconfig
        if check_data(cfg.data, KEYS, int(dd.timesteps), int(dd.resolution)):
            raise UserError("some training clips are unreadable (listed above)")
        return {}
    result = train(cfg, resume=not args.no_resume, overwrite=args.overwrite, progress=not args.no_progress)
    last = result["history"][-1] if result["history"] else {}
    summary = {"step": result["step"], "val_loss": last.get("val_loss"), "out_dir": str(cfg.out_dir)}
    print_summary({**summary, "num_processes": result["num_processes"]})
    return result


if __name__ == "__main__":
    cli_main(main)
