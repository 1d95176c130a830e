"""Shared by AToM training and inference: default config, model construction, checkpoint reading."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from AToM.diffusion import GaussianDiffusion
from AToM.model import MotionDecoder
from moditalker.checkpoint import CHECK_HINT, load_strict
from moditalker.checkpoint import read_checkpoint as read_checkpoint_file
from moditalker.errors import UserError, describe
from moditalker.fileio import REPO_ROOT

#: The official full-size configuration, used when no config is given: the model, diffusion and sample
#: sections of configs/atom.yaml, where they live (with their comments)
DEFAULT_CONFIG: dict = {
    key: value
    for key, value in OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "configs" / "atom.yaml")).items()
    if key in ("model", "diffusion", "sample")
}

CHECKPOINT_KEYS = ("model_state_dict", "ema_state_dict", "optimizer_state_dict")


def as_config(config: str | Path | dict | DictConfig | None) -> DictConfig:
    """Defaults <- ``config`` (a YAML path, dict or DictConfig)."""
    base = OmegaConf.create(DEFAULT_CONFIG)
    if config is None:
        return base
    if isinstance(config, (str, Path)):
        from moditalker.config import load_config

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


def read_checkpoint(path: str | Path) -> dict:
    """Load an AToM checkpoint dict (official or ours) on the CPU, with clear errors."""
    ckpt = read_checkpoint_file(path, "AToM")
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        got = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{path} is not an AToM checkpoint (expected keys {CHECKPOINT_KEYS}, got {got}); {CHECK_HINT}"
        )
    return ckpt


def load_weights(model: MotionDecoder, sd: dict, path: str | Path, which: str) -> None:
    """Strict load of one of the checkpoint's state_dicts (``which``) into ``model``."""
    sizes = (
        f"latent_dim={model.latent_dim}, seq_len={model.seq_len}, layers={len(model.seqTransDecoder.stack)}"
    )
    load_strict(model, sd, path, f"AToM {which} in", sizes)
