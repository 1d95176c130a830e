"""Shared by AToM training and inference: default config, model construction, checkpoint reading."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from AToM.diffusion import GaussianDiffusion
from AToM.model import MotionDecoder
from data.errors import UserError, describe

# The official full-size configuration (also in configs/atom.yaml); used when no config is given.
DEFAULT_CONFIG: dict = {
    "model": {
        "nfeats": 204,
        "seq_len": 156,
        "latent_dim": 512,
        "ff_size": 1024,
        "num_layers": 8,
        "num_heads": 8,
        "dropout": 0.1,
        "cond_feature_dim": 1024,
        "activation": "gelu",
        "use_rotary": True,
    },
    "diffusion": {
        "horizon": 156,
        "repr_dim": 204,
        "schedule": "cosine",
        "n_timestep": 1000,
        "predict_epsilon": False,
        "loss_type": "l2",
        "use_p2": False,
        "cond_drop_prob": 0.25,
        "guidance_weight": 2.0,
        "clip_denoised": True,
    },
    "sample": {"steps": 50, "eta": 1.0, "overlap": 39},
}

CHECKPOINT_KEYS = ("model_state_dict", "ema_state_dict", "optimizer_state_dict")


def as_config(config: str | Path | dict | DictConfig | None) -> DictConfig:
    """Defaults <- ``config`` (a YAML path, dict or DictConfig)."""
    base = OmegaConf.create(DEFAULT_CONFIG)
    if config is None:
        return base
    if isinstance(config, (str, Path)):
        from data.config import load_config

        return load_config(config, (), DEFAULT_CONFIG)
    return OmegaConf.merge(base, OmegaConf.create(config) if isinstance(config, dict) else config)


def build_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    """``GaussianDiffusion(MotionDecoder(**cfg.model), **cfg.diffusion)`` with a size check."""
    model_kw = OmegaConf.to_container(cfg.model, resolve=True)
    diff_kw = OmegaConf.to_container(cfg.diffusion, resolve=True)
    if diff_kw["horizon"] != model_kw["seq_len"]:
        raise UserError(
            f"diffusion.horizon ({diff_kw['horizon']}) must equal model.seq_len ({model_kw['seq_len']})"
        )
    try:
        return GaussianDiffusion(MotionDecoder(**model_kw), **diff_kw)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: e.g. a negative size
        raise UserError(f"bad AToM model/diffusion config: {describe(exc)}") from exc


def strip_module_prefix(sd: dict) -> dict:
    """Drop a ``module.`` prefix (checkpoints saved from DDP)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def read_checkpoint(path: str | Path) -> dict:
    """Load an AToM checkpoint dict (official or ours) on the CPU, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"AToM checkpoint not found: {path}; see `python -m data.assets check`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad/foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read AToM checkpoint {path}: {first}") from exc
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        got = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{path} is not an AToM checkpoint (expected keys {CHECKPOINT_KEYS}, got {got}); "
            "see `python -m data.assets check`"
        )
    return ckpt


def load_weights(model: MotionDecoder, sd: dict, path: str | Path, which: str) -> None:
    """``load_state_dict(strict=True)`` turning a mismatch into one readable UserError."""
    sd = strip_module_prefix(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with other shapes (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise UserError(
            f"{which} in {path} does not match the AToM config: {'; '.join(parts)}; "
            "pass the --config the checkpoint was trained with"
        )
    model.load_state_dict(sd, strict=True)
