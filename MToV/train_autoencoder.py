"""Train the MToV video autoencoders: ``python -m MToV.train_autoencoder --config ... [key=value ...]``.

Two modes (``mode:`` in the config):

* ``rgb``: the RGB autoencoder on video clips ``x`` (``autoencoder_rgb.pth``);
* ``ldmk``: the landmark ("motion") autoencoder on rendered landmark clips ``x_l``, initialised
  from the RGB checkpoint (``init_from``) with the TimeSformer decoder frozen
  (``freeze_decoder``), as the original ``first_stage_ldmk`` (``autoencoder_motion.pth``); or from
  scratch (no ``init_from``, ``freeze_decoder=false``), as the learning benchmark's small models.

Objective (``MToV.losses``): 4*L1 + 4*LPIPS(one random frame per clip); from step ``disc_start``
on, also the 2D/3D PatchGAN hinge game with feature matching. AdamW (betas 0.5, 0.9), gradient
accumulation, fp16 autocast + grad scaling on CUDA only, ``accelerate`` for CPU / one GPU /
``accelerate launch`` multi-GPU or multi-node. Resumable: ``{out_dir}/state`` holds model,
optimizers, scaler, RNG states and the step; rerunning the same command continues from it.

Outputs in ``out_dir``: ``config.yaml`` (resolved), ``model_last.pth`` / ``model_best.pth`` (plain
state_dicts, the official checkpoint layout), ``metrics.jsonl`` (validation PSNR per evaluation),
``tb/`` (tensorboard), ``state/`` (resume).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from moditalker.config import load_config
from moditalker.device import resolve_device
from moditalker.errors import UserError, cli_main, script_prog
from moditalker.fileio import repo_path, torch_save
from moditalker.training.accelerator import (
    check_train_loader,
    start_accelerator,
    train_val_loaders,
)
from moditalker.training.bad_items import BadItems
from moditalker.training.loop import PassBatches, TrainingRun, check_finite_loss
from moditalker.training.options import add_run_arguments, apply_run_arguments, print_summary
from moditalker.training.run_state import check_inputs_are_not_outputs
from MToV.dataset import build_dataset, check_data, data_defaults
from MToV.losses import AELossWeights, AutoencoderLoss, build_lpips
from MToV.models.autoencoder import OFFICIAL_CONFIG, ViTAutoencoder, load_autoencoder_weights
from MToV.models.discriminator import PatchDiscriminator2D, PatchDiscriminator3D

DEFAULTS: dict = {
    "mode": "rgb",
    "init_from": None,
    "freeze_decoder": None,  # None: True in ldmk mode, False in rgb mode
    "out_dir": "runs/mtov_autoencoder",
    "model": copy.deepcopy(OFFICIAL_CONFIG),
    "data": data_defaults(max_val_clips=100),
    "loss": {
        "l1_weight": 4.0,
        "perceptual_weight": 4.0,
        "lpips_vgg": None,  # None: checkpoints/lpips/vgg16.pth
        "lpips_random_backbone": False,
        "disc_start": 100_000_000,
        "gan_weight": 1.0,
        "feature_matching_weight": 4.0,
        "foreground_weight": 1.0,  # > 1: L1 weighs the target's non-black pixels more (landmark dots)
        "latent_weight": 0.0,  # > 0: + weight * mean square of the latent before its tanh (no saturation)
        "disc_layers": 3,
        "disc_ndf": 64,
    },
    "train": {
        "lr": 1e-4,
        "betas": [0.5, 0.9],
        "weight_decay": 0.01,
        "batch_size": 1,
        "grad_accum": 3,
        "max_steps": 200_000,
        "amp": True,
        "seed": 0,
        "log_every": 50,
        "val_every": 2000,
        "save_every": 2000,
        "device": "auto",
    },
}


def _frames_to_video(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """[(B*T), C, H, W] (frame-major per clip) -> [B, C, T, H, W]."""
    bt, c, h, w = frames.shape
    return frames.view(batch, bt // batch, c, h, w).transpose(1, 2)


def psnr(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR (dB) of [B, C, T, H, W] clips in [-1, 1], measured on the [0, 1] scale."""
    mse = ((target.float() - recon.float()) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.inference_mode()
def evaluate_psnr(
    model: ViTAutoencoder, loader: DataLoader, key: str, device: torch.device, max_clips: int
) -> float:
    """Mean PSNR of reconstructions over up to ``max_clips`` validation clips."""
    was_training = model.training
    model.eval()
    scores = []
    for batch in loader:
        x = batch[key].to(device)
        rec = _frames_to_video(model(x)[0].clamp(-1, 1), x.shape[0])
        scores.append(psnr(x, rec).cpu())
        if sum(len(s) for s in scores) >= max_clips:
            break
    model.train(was_training)
    return float(torch.cat(scores)[:max_clips].mean())


def train(cfg: DictConfig, resume: bool = True, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or continue) one autoencoder training; returns ``{"step", "best_psnr", "history"}``."""
    from accelerate.utils import set_seed

    mode = cfg.mode
    if mode not in ("rgb", "ldmk"):
        raise UserError(f"mode must be rgb or ldmk, got {mode!r}")
    key = "x" if mode == "rgb" else "x_l"
    check_inputs_are_not_outputs(
        Path(cfg.out_dir), {"init_from": repo_path(cfg.init_from) if cfg.init_from else None}
    )
    run = TrainingRun(cfg.out_dir, resume, overwrite)
    tc, lc, dc = cfg.train, cfg.loss, cfg.data
    device = resolve_device(tc.device)
    use_amp = bool(tc.amp) and device.type == "cuda"
    accelerator = start_accelerator(
        f"MToV {mode} autoencoder train",
        device,
        cpu=device.type == "cpu",
        mixed_precision="fp16" if use_amp else "no",
    )
    set_seed(int(tc.seed))
    model, opt, disc2d, disc3d, opt_d = _models(cfg, initialise=not run.resuming)
    criterion = _criterion(lc, accelerator.device)

    train_ds, train_loader, val_loader = _loaders(cfg, key, accelerator.num_processes)
    if disc2d is not None:
        model, opt, disc2d, disc3d, opt_d, train_loader = accelerator.prepare(
            model, opt, disc2d, disc3d, opt_d, train_loader
        )
    else:
        model, opt, train_loader = accelerator.prepare(model, opt, train_loader)
    check_train_loader(train_loader, len(train_ds), int(tc.batch_size), accelerator.num_processes)
    info = run.open(
        accelerator, cfg, BadItems(float(dc.max_bad_items), len(train_ds), train_ds.name), int(tc.seed)
    )
    best = float(info.get("best_psnr", -math.inf))
    # exact resume in the middle of a pass over the windows
    stream = PassBatches(train_loader, int(tc.seed), info.get("data_pass"), run.resumed_rng)
    batches = run.counted(stream)
    step_fn = _StepFn(accelerator, model, opt, disc2d, disc3d, opt_d, criterion, batches, key,
                      int(tc.grad_accum), int(lc.disc_start), float(lc.latent_weight))  # fmt: skip

    def validate(step: int) -> dict | None:
        if not run.main:
            return None
        net = accelerator.unwrap_model(model)
        return {"val_psnr": evaluate_psnr(net, val_loader, key, accelerator.device, int(dc.max_val_clips))}

    def write_models(step: int, record: dict | None) -> None:
        nonlocal best
        if record is not None:
            state = {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}
            torch_save(state, run.out_dir / "model_last.pth")
            if record["val_psnr"] > best:
                best = record["val_psnr"]
                torch_save(state, run.out_dir / "model_best.pth")

    model.train()
    step = run.loop(step_fn, validate, max_steps=int(tc.max_steps), log_every=int(tc.log_every),
                    val_every=int(tc.val_every), save_every=int(tc.save_every), desc=f"AE[{mode}]",
                    progress=progress, postfix=("l1", "lpips"), after_validation=write_models,
                    on_save=lambda step: {"best_psnr": best, "data_pass": stream.record()})  # fmt: skip
    run.close()
    return {
        "step": step,
        "best_psnr": best,
        "history": run.history,
        "num_processes": accelerator.num_processes,
    }


def _loaders(cfg: DictConfig, key: str, num_processes: int) -> tuple:
    """(training clips, training loader, validation loader) of clips ``key`` at the model's size."""
    dc, dd = cfg.data, cfg.model.ddconfig
    timesteps, resolution = int(dd.timesteps), int(dd.resolution)
    train_ds = build_dataset(dc, "train", (key,), timesteps, resolution)
    val_ds = build_dataset(dc, "test", (key,), timesteps, resolution)
    batch = int(cfg.train.batch_size)
    return train_ds, *train_val_loaders(train_ds, val_ds, batch, int(dc.num_workers), num_processes)


def _models(cfg: DictConfig, initialise: bool) -> tuple:
    """(autoencoder, its optimizer, 2D and 3D discriminators and their optimizer or Nones); a new run
    (``initialise``) starts from ``init_from`` (ldmk mode without it: from scratch, which needs
    ``freeze_decoder=false``); the decoder is frozen in ldmk mode unless ``freeze_decoder`` says."""
    tc, lc = cfg.train, cfg.loss
    freeze_decoder = (cfg.mode == "ldmk") if cfg.freeze_decoder is None else bool(cfg.freeze_decoder)
    model = ViTAutoencoder(cfg.model.embed_dim, OmegaConf.to_container(cfg.model.ddconfig, resolve=True))
    if initialise and cfg.init_from:
        load_autoencoder_weights(model, repo_path(cfg.init_from), "initial (init_from) autoencoder")
    elif initialise and cfg.mode == "ldmk" and freeze_decoder:
        raise UserError(
            "ldmk mode starts from the RGB autoencoder: set init_from=/path/to/autoencoder_rgb.pth "
            "(the model_last.pth of an rgb run), or train it from scratch with freeze_decoder=false"
        )
    if freeze_decoder:
        for name, p in model.named_parameters():
            if name.startswith("decoder."):
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    if int(lc.disc_start) >= int(tc.max_steps):  # the GAN phase never starts
        return model, opt, None, None, None
    disc2d = PatchDiscriminator2D(3, lc.disc_ndf, lc.disc_layers)
    disc3d = PatchDiscriminator3D(3, lc.disc_ndf, lc.disc_layers)
    opt_d = torch.optim.AdamW(
        list(disc2d.parameters()) + list(disc3d.parameters()),
        lr=tc.lr,
        betas=tuple(tc.betas),
        weight_decay=tc.weight_decay,
    )
    return model, opt, disc2d, disc3d, opt_d


def _criterion(lc, device: torch.device) -> AutoencoderLoss:
    lpips = None
    if lc.perceptual_weight > 0:
        lpips = build_lpips(lc.lpips_vgg, random_backbone=bool(lc.lpips_random_backbone)).to(device)
    weights = AELossWeights(
        lc.l1_weight, lc.perceptual_weight, lc.gan_weight, lc.feature_matching_weight, lc.foreground_weight
    )
    return AutoencoderLoss(lpips, weights)


class _StepFn:
    """One optimizer step of the autoencoder over ``accum`` micro-batches (gradients all-reduced on
    the last only), then, from step ``disc_start`` (0-based) on, one of the discriminators on the
    same reconstructions; returns the losses to log."""

    def __init__(
        self, accelerator, model, opt, disc2d, disc3d, opt_d, criterion, batches, key, accum, disc_start,
        latent_weight=0.0,
    ):  # fmt: skip
        self.acc, self.model, self.opt, self.criterion = accelerator, model, opt, criterion
        self.disc2d, self.disc3d, self.opt_d = disc2d, disc3d, opt_d
        self.batches, self.key, self.accum, self.disc_start = batches, key, accum, disc_start
        self.latent_weight, self.pre_tanh = latent_weight, []
        if latent_weight > 0:  # the latent planes before their tanh, to keep them out of saturation
            net = accelerator.unwrap_model(model)
            for conv in (net.pre_xy, net.pre_yt, net.pre_xt):
                conv.register_forward_hook(self._keep_pre_tanh)

    def _keep_pre_tanh(self, _module, _inputs, out: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training forwards only (validation runs under inference_mode)
            self.pre_tanh.append(out)

    def __call__(self, step: int) -> dict:
        acc, accum = self.acc, self.accum
        use_gan = self.disc2d is not None and step >= self.disc_start
        kept, running, total = [], {}, 0.0
        for micro in range(accum):
            x = next(self.batches)[self.key]
            ctx = acc.no_sync(self.model) if micro < accum - 1 else contextlib.nullcontext()
            self.pre_tanh.clear()
            with ctx:
                with acc.autocast():
                    rec = _frames_to_video(self.model(x)[0], x.shape[0])
                    idx = torch.randint(0, x.shape[2], (x.shape[0],), device=x.device)
                    d2, d3 = (self.disc2d, self.disc3d) if use_gan else (None, None)
                    loss, logs = self.criterion.generator(x, rec, idx, d2, d3)
                    if self.pre_tanh:
                        latent_l2 = torch.stack([p.float().pow(2).mean() for p in self.pre_tanh]).mean()
                        self.pre_tanh.clear()
                        loss = loss + self.latent_weight * latent_l2
                        logs["latent_l2"] = latent_l2.detach()
                acc.backward(loss / accum)
            total += float(loss.detach()) / accum
            if use_gan:
                kept.append((x, rec.detach(), idx))
            for k, v in logs.items():
                running[k] = running.get(k, 0.0) + float(v) / accum
        check_finite_loss(total, step + 1, "lower train.lr, or check the training frames")  # before the step
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if use_gan:
            self.opt_d.zero_grad(set_to_none=True)
            for x, rec, idx in kept:
                with acc.autocast():
                    d_loss, d_logs = self.criterion.discriminator(x, rec, idx, self.disc2d, self.disc3d)
                acc.backward(d_loss / accum)
                for k, v in d_logs.items():
                    running[k] = running.get(k, 0.0) + float(v) / accum
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        return running


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=script_prog("python -m MToV.train_autoencoder"),
        description="Train the MToV RGB or landmark video autoencoder (resumable; accelerate).",
    )
    add_run_arguments(p, "configs/mtov_autoencoder.yaml")
    p.add_argument("--mode", choices=["rgb", "ldmk"], default=None, help="overrides mode in the config")
    p.add_argument("--init_from", default=None, help="ldmk mode: the RGB autoencoder checkpoint")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides, DEFAULTS, strict=True)
    for name in ("mode", "init_from"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    apply_run_arguments(cfg, args)
    if args.check:
        dd = cfg.model.ddconfig
        key = "x" if cfg.mode == "rgb" else "x_l"
        if check_data(cfg.data, (key,), int(dd.timesteps), int(dd.resolution)):
            raise UserError("some training clips are unreadable (listed above)")
        return {}
    result = train(cfg, resume=not args.no_resume, overwrite=args.overwrite, progress=not args.no_progress)
    summary = {"step": result["step"], "best_val_psnr": result["best_psnr"], "out_dir": cfg.out_dir}
    print_summary({**summary, "num_processes": result["num_processes"]})
    return result


if __name__ == "__main__":
    cli_main(main)
