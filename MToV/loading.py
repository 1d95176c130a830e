"""Loading MToV: the model settings, the three networks (RGB autoencoder, landmark autoencoder, UNet)
built from a config, their checkpoints, and where and in which precision they run.

:func:`load_mtov` is the entry point (the CLI ``python -m MToV.sample``, the end-to-end pipeline, the
benchmark); :func:`build_models` and :func:`load_unet_weights` are shared with diffusion training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moditalker.checkpoint import load_strict, read_checkpoint, unwrap_state_dict
from moditalker.config import load_config
from moditalker.device import amx_bf16_supported, bf16_supported, int8_dot_supported, resolve_device
from moditalker.errors import UserError
from moditalker.fileio import REPO_ROOT, repo_path
from MToV.diffusion import DDPM
from MToV.int8 import int8_convs_supported, quantize_convs, quantize_linears
from MToV.models.autoencoder import ViTAutoencoder, load_autoencoder_weights
from MToV.models.unet import DiffusionWrapper, UNetModel

quantize_int8 = quantize_linears  # its earlier name, kept importable

__all__ = [
    "MODEL_DEFAULTS",
    "PRECISIONS",
    "MToVModels",
    "PrecisionPlan",
    "autoencoder_dtype",
    "build_ddpm",
    "build_models",
    "load_mtov",
    "load_unet_weights",
    "model_config",
    "precision_plan",
    "prepare_for_device",
    "quantize_int8",  # the earlier name of MToV.int8.quantize_linears
    "undo_prepare",
]

#: Model settings shared by sampling and diffusion training (the official full-size values): the
#: model sections of configs/mtov_diffusion.yaml, where they live (with their comments)
MODEL_DEFAULTS: dict = {
    key: value
    for key, value in OmegaConf.to_container(
        OmegaConf.load(REPO_ROOT / "configs" / "mtov_diffusion.yaml")
    ).items()
    if key in ("autoencoder", "autoencoder_ldmk", "unet", "diffusion", "checkpoints", "sample")
}

#: Choices of the autoencoders' precision (see :func:`autoencoder_dtype`).
PRECISIONS = ("auto", "bf16", "fp32", "int8")


@dataclass
class MToVModels:
    """The three networks of MToV, in eval mode on one device, plus the config they came from."""

    ae_rgb: ViTAutoencoder
    ae_ldmk: ViTAutoencoder
    unet: DiffusionWrapper
    config: DictConfig
    device: torch.device
    _int8: tuple[ViTAutoencoder, ViTAutoencoder] | None = field(default=None, repr=False, compare=False)
    _int8_unet: DiffusionWrapper | None = field(default=None, repr=False, compare=False)

    @property
    def resolution(self) -> int:
        return self.ae_rgb.res

    @property
    def clip_frames(self) -> int:
        return self.ae_rgb.s

    def autoencoders(self, plan: PrecisionPlan) -> tuple[ViTAutoencoder, ViTAutoencoder]:
        """(RGB, landmark) autoencoder for ``plan``: the networks themselves, or for int8 their
        quantised copies (made once per :class:`MToVModels` and kept)."""
        if plan.autoencoders != "int8":
            return self.ae_rgb, self.ae_ldmk
        if self._int8 is None:
            self._int8 = (quantize_linears(self.ae_rgb), quantize_linears(self.ae_ldmk))
        return self._int8

    def unet_for(self, plan: PrecisionPlan | None = None) -> DiffusionWrapper:
        """The UNet for ``plan``: the network itself, or for int8 its copy with int8 convolutions
        (:func:`MToV.int8.quantize_convs`, made once per :class:`MToVModels` and kept)."""
        if plan is None or plan.unet != "int8":
            return self.unet
        if self._int8_unet is None:
            self._int8_unet = quantize_convs(self.unet)
        return self._int8_unet

    def sampler(self, sampling_timesteps: int, eta: float, plan: PrecisionPlan | None = None) -> DDPM:
        """The DDIM sampler over the RGB latent, with the schedule of ``config.diffusion``; its UNet
        runs in ``plan``'s arithmetic (fp32 without a plan)."""
        ddpm = build_ddpm(
            self.unet_for(plan),
            self.ae_rgb,
            self.config.diffusion,
            sampling_timesteps=sampling_timesteps,
            ddim_sampling_eta=eta,
        )
        return ddpm.to(self.device)


def build_ddpm(unet: DiffusionWrapper, ae_rgb: ViTAutoencoder, diffusion: Mapping, **kwargs: Any) -> DDPM:
    """The DDPM over ``ae_rgb``'s latent (channels, plane size, frames) with the schedule of a model
    config's ``diffusion`` section; ``kwargs`` (e.g. ``loss_type``, ``sampling_timesteps``) go to DDPM."""
    schedule = {k: diffusion[k] for k in ("linear_start", "linear_end", "timesteps")}
    return DDPM(unet, channels=ae_rgb.embed_dim, image_size=ae_rgb.r, frames=ae_rgb.s, **schedule, **kwargs)


def model_config(config: str | Path | Mapping | DictConfig | None = None) -> DictConfig:
    """MODEL_DEFAULTS <- ``config`` (YAML path or mapping): the config of :func:`load_mtov`."""
    if config is None or isinstance(config, str | Path):
        return load_config(None if config is None else repo_path(str(config)), (), MODEL_DEFAULTS)
    return OmegaConf.merge(OmegaConf.create(MODEL_DEFAULTS), OmegaConf.create(config))


def build_models(cfg: DictConfig) -> tuple[ViTAutoencoder, ViTAutoencoder, DiffusionWrapper]:
    """Construct (RGB AE, landmark AE, UNet wrapper) from a model config; sizes are checked to agree."""
    ae_cfg = OmegaConf.to_container(cfg.autoencoder, resolve=True)
    ldmk_cfg = ae_cfg if cfg.get("autoencoder_ldmk") is None else OmegaConf.to_container(cfg.autoencoder_ldmk)
    try:
        ae_rgb = ViTAutoencoder(ae_cfg["embed_dim"], ae_cfg["ddconfig"])
        ae_ldmk = ViTAutoencoder(ldmk_cfg["embed_dim"], ldmk_cfg["ddconfig"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"bad autoencoder config: {exc!r}; see configs/mtov_diffusion.yaml") from exc
    if ae_ldmk.latent_length != ae_rgb.latent_length or ae_ldmk.s != ae_rgb.s:
        raise UserError(
            f"the landmark autoencoder's latent ({ae_ldmk.embed_dim}x{ae_ldmk.latent_length}, {ae_ldmk.s} "
            f"frames) must match the RGB one's ({ae_rgb.embed_dim}x{ae_rgb.latent_length}, {ae_rgb.s} frames)"
        )
    unet_cfg = OmegaConf.to_container(cfg.unet, resolve=True)
    unet_cfg.setdefault("frames", ae_rgb.s)
    if int(unet_cfg["image_size"]) != ae_rgb.r or int(unet_cfg["frames"]) != ae_rgb.s:
        raise UserError(
            f"unet.image_size={unet_cfg['image_size']}, unet.frames={unet_cfg['frames']} do not match the "
            f"autoencoder latent ({ae_rgb.r}x{ae_rgb.r} plane, {ae_rgb.s} frames): fix the config"
        )
    if int(unet_cfg["in_channels"]) != ae_rgb.embed_dim or ae_ldmk.embed_dim != ae_rgb.embed_dim:
        raise UserError(
            f"unet.in_channels={unet_cfg['in_channels']} must equal the autoencoders' embed_dim "
            f"({ae_rgb.embed_dim}, {ae_ldmk.embed_dim})"
        )
    try:
        unet = UNetModel(**unet_cfg)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad unet config {unet_cfg}: {exc}") from exc
    return ae_rgb, ae_ldmk, DiffusionWrapper(unet)


def load_unet_weights(wrapper: DiffusionWrapper, path: str | Path) -> DiffusionWrapper:
    """Load ``diffusion_model.pth`` (a DiffusionWrapper state_dict; bare UNet keys, ``module.``
    prefixes and ``{"model"|"state_dict"|"ema": ...}`` wrappers are accepted) strictly."""
    state = unwrap_state_dict(read_checkpoint(path, "MToV UNet"), path, ("ema", "model", "state_dict"))
    if not any(k.startswith("diffusion_model.") for k in state):
        state = {f"diffusion_model.{k}": v for k, v in state.items()}
    u = wrapper.diffusion_model
    sizes = f"model_channels={u.model_channels}, cond_model={u.cond_model}"
    return load_strict(wrapper, state, path, "MToV UNet checkpoint", sizes)


def load_mtov(
    ae_rgb: str | None,
    ae_ldmk: str | None,
    unet: str | None,
    config: Any = None,
    device: str | torch.device = "cpu",
    random_weights: bool = False,
) -> MToVModels:
    """Build the MToV networks from ``config`` (YAML path, mapping or None = official sizes) and load
    the three checkpoints (``None`` = the config's ``checkpoints`` path); ``random_weights`` skips
    loading and keeps a seeded random initialisation (smoke tests, the pipeline's tiny mode)."""
    cfg = model_config(config)
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(0)
        m_rgb, m_ldmk, m_unet = build_models(cfg)
    if not random_weights:
        ck = cfg.checkpoints
        load_autoencoder_weights(m_rgb, ae_rgb or repo_path(ck.ae_rgb), "MToV RGB autoencoder")
        load_autoencoder_weights(m_ldmk, ae_ldmk or repo_path(ck.ae_ldmk), "MToV landmark autoencoder")
        load_unet_weights(m_unet, unet or repo_path(ck.unet))
    nets = [n.to(dev).eval().requires_grad_(False) for n in (m_rgb, m_ldmk, m_unet)]
    return MToVModels(nets[0], nets[1], nets[2], cfg, dev)


@dataclass(frozen=True)
class PrecisionPlan:
    """The arithmetic each MToV network runs in: ``autoencoders`` fp32 | bf16 (autocast) | int8 (their
    linear layers dynamically quantised, CPU only); ``unet`` fp32 | int8 (its convolutions, CPU only;
    see :func:`precision_plan`)."""

    autoencoders: str
    unet: str = "fp32"

    @property
    def autoencoder_dtype(self) -> torch.dtype:
        """The autocast dtype of the autoencoders (int8 layers take fp32 activations)."""
        return torch.bfloat16 if self.autoencoders == "bf16" else torch.float32

    def per_network(self) -> dict[str, str]:
        """``precision_used``: network -> arithmetic, as the benchmark and the stage timings report it."""
        return {"ae_rgb": self.autoencoders, "ae_ldmk": self.autoencoders, "unet": self.unet}


def precision_plan(precision: str, device: torch.device) -> PrecisionPlan:
    """``mtov.precision`` -> the arithmetic per network on ``device``, chosen by capability:

    * ``fp32``: everything fp32 (equals the original's frames up to float rounding);
    * ``bf16``: the autoencoders under bf16 autocast;
    * ``int8``: the autoencoders' linear layers in int8 with per-call activation scales (dynamic
      quantisation, CPU only; each clip is encoded and decoded on its own so that its frames do not
      depend on the batch it runs in), and the UNet's convolutions in int8 with per-sample activation
      scales (:class:`MToV.int8.Int8Conv`) where the CPU has int8 dot products (VNNI or AMX,
      :func:`moditalker.device.int8_dot_supported`: without them a pass was no faster) and this torch
      build has oneDNN's int8 convolution (:func:`MToV.int8.int8_convs_supported`); fp32 UNet otherwise;
    * ``auto``: bf16 autoencoders where the device has bf16 matrix units (CUDA with bf16; CPUs with
      AMX bf16 tiles, :func:`moditalker.device.amx_bf16_supported`), int8 on every other CPU (also
      those whose bf16 is AVX512-BF16 dot products only), fp32 elsewhere. This is the capability
      rule; the commands resolve ``auto`` on the CPU by measurement instead
      (:func:`MToV.calibration.resolve_plan`: reduced precision only where it was timed at least
      1.15x faster than fp32 on this machine), keeping this rule for GPUs and tiny networks.

    bf16 never reaches the UNet: bf16 autocast gained only 1.15x there on the CPU.
    Measured on a 2-core AMD EPYC with AVX512-BF16 and AVX512-VNNI (no AMX), one full-size 16-frame
    clip: encode fp32 10.7 s, bf16 6.3 s, int8 6.2 s; decode 9.0 / 5.5 / 5.6 s; decoded frames 52.4 dB
    (bf16) and 45.8 dB (int8) from fp32; a batch-of-4 UNet pass 1.9-2.1 s in fp32, 1.6 s with int8
    convolutions, and a whole clip's frames 40.8 dB from fp32 with both networks in int8 (42.2 dB with
    int8 autoencoders alone; random weights). The whole pipeline there (4 s of video, tcmalloc, one run
    each): 58.9 s per second of video with bf16 autoencoders, 48.9 with int8, both well above 35 dB from
    fp32; so ``auto`` takes int8 on such CPUs and bf16 only where AMX runs it (not measured here).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise UserError(f"mtov.precision=int8 (dynamic quantisation) runs on the CPU only, not on {device}")
    if precision == "auto":
        if device.type == "cpu":
            precision = "bf16" if bf16_supported(device) and amx_bf16_supported() else "int8"
        else:
            precision = "bf16" if bf16_supported(device) else "fp32"
    unet = "int8" if precision == "int8" and int8_dot_supported() and int8_convs_supported() else "fp32"
    return PrecisionPlan(autoencoders=precision, unet=unet)


def autoencoder_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of the autoencoders under ``precision`` (see :func:`precision_plan`)."""
    return precision_plan(precision, device).autoencoder_dtype


def prepare_for_device(models: MToVModels, compile: bool = False) -> MToVModels:
    """GPU fast path: channels-last UNet (convolutions) and, with ``compile``, ``torch.compile`` of the
    UNet forward. CPUs gain nothing from either (measured), so only CUDA is touched. Idempotent."""
    if models.device.type != "cuda" or getattr(models, "_prepared", False):
        return models
    models.unet.to(memory_format=torch.channels_last)
    if compile:  # one compiled forward per models: prepared again after undo_prepare, it is not recompiled
        if getattr(models, "_compiled_forward", None) is None:
            models._compiled_forward = torch.compile(models.unet.diffusion_model.forward)
        models.unet.diffusion_model.forward = models._compiled_forward
    models._prepared = True
    return models


def undo_prepare(models: MToVModels) -> MToVModels:
    """Undo :func:`prepare_for_device`: the UNet's own (eager) forward, contiguous weights (the
    benchmark's faithful mode runs the original's eager UNet on the same networks). Idempotent."""
    if not getattr(models, "_prepared", False):
        return models
    models.unet.diffusion_model.__dict__.pop("forward", None)  # the compiled wrapper, an instance attribute
    models.unet.to(memory_format=torch.contiguous_format)
    models._prepared = False
    return models
