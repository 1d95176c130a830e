"""MToV sampling: aligned landmarks + reference frames -> talking-head frames.

``python -m MToV.sample --landmarks aligned.npy --ref_video ref.mp4 --out results/x`` (see
``--help``), or from Python :func:`load_mtov` + :func:`generate_video` (the end-to-end pipeline).

The original's inference path: every non-overlapping 16-frame clip is sampled independently. The
conditions are the landmark-AE latent of the rendered landmark clip and the RGB-AE latent of the
reference frames masked below the nose; the reference is the identity frame repeated over a clip,
whose full tri-plane latent is the SDEdit start (noised to t = start_ratio * 1000 = 250) and whose
xy-plane is the UNet's image condition. DDIM with eta 1 over the last 25 steps of a 100-step
schedule; x0 clamped to [-1, 1]; decoded with the RGB AE.

Here clips run in batches; the reference latent is encoded once per video; only the encoders the
sampler needs run (``extract``); a clip whose frames were already encoded (a still reference image
gives the same masked clip every time) reuses its latent; each clip draws its noise from its own
generator seeded by (seed, clip index), so the result does not depend on ``batch_size``. Any length
works: the last partial clip is padded by repeating its last frame and trimmed afterwards.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from moditalker.checkpoint import load_strict, read_checkpoint, unwrap_state_dict
from moditalker.config import load_config, save_config
from moditalker.constants import FPS, SAMPLE_RATE
from moditalker.device import autocast, bf16_supported, resolve_device
from moditalker.errors import UserError, cli_main
from moditalker.fileio import repo_path
from moditalker.timing import StageTimer
from MToV.diffusion import DDPM, ddim_times
from MToV.models.autoencoder import OFFICIAL_CONFIG, ViTAutoencoder, load_autoencoder_weights
from MToV.models.unet import DiffusionWrapper, UNetModel

_StageTimer = StageTimer  # the benchmark swaps the clock through this name (until it has a seam)

#: Model settings shared by sampling and diffusion training (the official full-size values).
MODEL_DEFAULTS: dict = {
    "autoencoder": copy.deepcopy(OFFICIAL_CONFIG),
    "autoencoder_ldmk": None,  # None: same sizes as the RGB autoencoder (as the official scripts)
    "unet": {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 128,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_heads": 8,
        "use_scale_shift_norm": True,
        "resblock_updown": True,
        "cond_model": False,
    },
    "diffusion": {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "loss_type": "l2"},
    "checkpoints": {
        "ae_rgb": "checkpoints/autoencoder_rgb.pth",
        "ae_ldmk": "checkpoints/autoencoder_motion.pth",
        "unet": "checkpoints/diffusion_model.pth",
    },
    "sample": {
        "batch_size": 4,
        "start_ratio": 0.25,
        "sampling_timesteps": 100,
        "eta": 1.0,
        "seed": 0,
        "use_last_as_reference": False,
    },
}


@dataclass
class MToVModels:
    """The three networks of MToV, in eval mode on one device, plus the config they came from."""

    ae_rgb: ViTAutoencoder
    ae_ldmk: ViTAutoencoder
    unet: DiffusionWrapper
    config: DictConfig
    device: torch.device

    @property
    def resolution(self) -> int:
        return self.ae_rgb.res

    @property
    def clip_frames(self) -> int:
        return self.ae_rgb.s

    def sampler(self, sampling_timesteps: int, eta: float) -> DDPM:
        """The DDIM sampler over the RGB latent, with the schedule of ``config.diffusion``."""
        return DDPM(
            self.unet,
            channels=self.ae_rgb.embed_dim,
            image_size=self.ae_rgb.r,
            frames=self.clip_frames,
            sampling_timesteps=sampling_timesteps,
            ddim_sampling_eta=eta,
            **{k: self.config.diffusion[k] for k in ("linear_start", "linear_end", "timesteps")},
        ).to(self.device)


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


def clip_generator(seed: int, clip: int, device: torch.device) -> torch.Generator:
    """The RNG of clip ``clip``: seeded from (seed, clip) only, so batching does not change it."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(clip)]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


PRECISIONS = ("auto", "bf16", "fp32")


def denoising_steps(start_ratio: float, sampling_timesteps: int, timesteps: int = 1000) -> int:
    """UNet passes per clip of the noised-start sampler: the DDIM times below ``int(T * start_ratio)``."""
    t_start = int(timesteps * start_ratio)
    return sum(1 for t, _ in ddim_times(timesteps, sampling_timesteps) if t < t_start)


def check_sampling(
    start_ratio: float, sampling_timesteps: int, eta: float = 1.0, timesteps: int = 1000
) -> None:
    """UserError unless the sampler settings run at least one denoising step.

    ``sampling_timesteps`` 0 (or too few for ``start_ratio``: 3 steps of 1000 put no step below
    t = 250) would return the noised reference latent undenoised, i.e. a noise video with exit 0.
    """
    if not (isinstance(start_ratio, int | float) and 0.0 < start_ratio < 1.0):
        raise UserError(f"start_ratio must be in (0, 1), got {start_ratio}")
    if isinstance(sampling_timesteps, bool) or not isinstance(sampling_timesteps, int | np.integer):
        raise UserError(f"sampling_timesteps must be an integer, got {sampling_timesteps!r}")
    if not 1 <= sampling_timesteps <= timesteps:
        raise UserError(f"sampling_timesteps must be in 1..{timesteps}, got {sampling_timesteps}")
    if not (isinstance(eta, int | float) and 0.0 <= eta <= 1.0):
        raise UserError(f"eta must be in [0, 1], got {eta}")
    if int(timesteps * start_ratio) < 1:
        raise UserError(f"start_ratio {start_ratio} starts at t = 0 of {timesteps}: nothing to denoise")
    if denoising_steps(start_ratio, sampling_timesteps, timesteps) == 0:
        need = next(
            s for s in range(sampling_timesteps, timesteps + 1) if denoising_steps(start_ratio, s, timesteps)
        )
        raise UserError(
            f"sampling_timesteps {sampling_timesteps} with start_ratio {start_ratio} runs no denoising "
            f"step (the output would be noise); use at least {need} steps"
        )


def autoencoder_dtype(precision: str, device: torch.device) -> torch.dtype:
    """dtype the autoencoders run in: ``auto`` = bf16 autocast where the device has bf16 matrix units
    (the decoded frames stay ~50 dB from fp32, 2x faster on CPU), else fp32; the UNet always runs fp32.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return torch.float32
    return torch.bfloat16


def prepare_for_device(models: MToVModels, compile: bool = False) -> MToVModels:
    """GPU fast path: channels-last UNet (convolutions) and, with ``compile``, ``torch.compile`` of the
    UNet forward. CPUs gain nothing from either (measured), so only CUDA is touched. Idempotent."""
    if models.device.type != "cuda" or getattr(models, "_prepared", False):
        return models
    models.unet.to(memory_format=torch.channels_last)
    if compile:
        models.unet.diffusion_model.forward = torch.compile(models.unet.diffusion_model.forward)
    models._prepared = True
    return models


def _to_model(frames: np.ndarray | torch.Tensor, size: int, device: torch.device, name: str) -> torch.Tensor:
    """uint8 [T, 3, S, S] -> float32 [T, 3, size, size] in [-1, 1] on ``device`` (resized if S != size)."""
    x = torch.as_tensor(np.asarray(frames))
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise UserError(f"{name} must be uint8 [T, 3, S, S], got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32) / 127.5 - 1.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _pad_clips(x: torch.Tensor, clip: int) -> torch.Tensor:
    """[T, 3, H, W] -> [n_clips, 3, clip, H, W], repeating the last frame to fill the last clip."""
    pad = (-x.shape[0]) % clip
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
    return x.reshape(-1, clip, *x.shape[1:]).transpose(1, 2)


def clip_keys(frames: np.ndarray, clip: int) -> list[bytes]:
    """One content hash per ``clip``-frame clip of uint8 ``[T, ...]`` frames (the last clip padded by
    repeating its last frame, as :func:`_pad_clips`): equal keys = equal clips = equal latents."""
    frames = np.ascontiguousarray(frames)
    keys = []
    for start in range(0, frames.shape[0], clip):
        block = frames[start : start + clip]
        h = hashlib.blake2b(block.tobytes(), digest_size=16)
        h.update(frames[-1].tobytes() * (clip - block.shape[0]))  # the padding frames
        keys.append(h.digest())
    return keys


class _LatentCache:
    """Latents by clip content: a clip seen before (a still reference image gives the same masked
    clip every time; a reference video played back and forth repeats clips) is not encoded again."""

    def __init__(self, extract) -> None:
        self.extract, self.latents = extract, {}

    def __call__(self, ae: ViTAutoencoder, clips: torch.Tensor, keys: Sequence[bytes]) -> torch.Tensor:
        todo: dict[bytes, int] = {}
        for j, k in enumerate(keys):
            if (id(ae), k) not in self.latents and k not in todo:
                todo[k] = j
        if todo:
            new = self.extract(ae, clips[list(todo.values())])
            for k, latent in zip(todo, new):
                self.latents[(id(ae), k)] = latent
        return torch.stack([self.latents[(id(ae), k)] for k in keys])


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [-1, 1] -> uint8 ``round((x + 1) * 127.5)``."""
    return ((frames + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def generate_video(
    models: MToVModels,
    landmark_video: np.ndarray,
    masked_frames: np.ndarray,
    identity_frame: np.ndarray,
    *,
    batch_size: int = 4,
    seed: int = 0,
    start_ratio: float = 0.25,
    sampling_timesteps: int = 100,
    use_last_as_reference: bool = False,
    progress: bool = True,
    eta: float = 1.0,
    precision: str = "auto",
    timings: dict[str, float] | None = None,
    return_float: bool = False,
) -> np.ndarray:
    """Generate uint8 ``[T, 3, S, S]`` frames for uint8 ``[T, 3, S, S]`` rendered landmarks and
    masked reference frames and a uint8 ``[3, S, S]`` identity (reference) frame.

    ``use_last_as_reference``: the last generated frame of clip i becomes the image condition of
    clip i+1 (the noised start stays the identity frame's latent, as the original); clips then run
    one after another. Inputs at another size than the autoencoder's are resized, the output is
    returned at the input size S.

    Fast path: ``precision="auto"`` runs the autoencoders (encodes and decode) under bf16 autocast
    where the device has bf16 matrix units, the UNet always in fp32; ``"fp32"`` keeps everything in
    fp32 (equal to the original's one-clip-at-a-time call pattern up to float rounding).
    ``timings`` (a dict) accumulates seconds under ``encode``, ``unet`` and ``decode``;
    ``return_float`` returns float32 frames in [-1, 1] instead of uint8.
    """
    n = int(np.asarray(landmark_video).shape[0]) if np.asarray(landmark_video).ndim == 4 else -1
    if n <= 0:
        raise UserError(f"landmark_video must be uint8 [T, 3, S, S], got {np.asarray(landmark_video).shape}")
    if np.asarray(masked_frames).shape != np.asarray(landmark_video).shape:
        raise UserError(
            f"masked_frames {np.asarray(masked_frames).shape} and landmark_video "
            f"{np.asarray(landmark_video).shape} must have the same shape [T, 3, S, S]"
        )
    ident = np.asarray(identity_frame)
    if ident.shape != np.asarray(landmark_video).shape[1:]:
        raise UserError(
            f"identity_frame must be uint8 {np.asarray(landmark_video).shape[1:]}, got {ident.shape}"
        )
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    check_sampling(start_ratio, sampling_timesteps, eta, int(models.config.diffusion.timesteps))
    out_size = int(ident.shape[-1])
    dev, size, clip = models.device, models.resolution, models.clip_frames
    ae_dtype = autoencoder_dtype(precision, dev)
    timed = _StageTimer(timings, dev)
    ddpm = models.sampler(sampling_timesteps, eta)
    n_xy = models.ae_rgb.r**2
    with torch.inference_mode():
        x_l = _pad_clips(_to_model(landmark_video, size, dev, "landmark_video"), clip)
        masked = _pad_clips(_to_model(masked_frames, size, dev, "masked_frames"), clip)
        ref = _to_model(ident[None], size, dev, "identity_frame")  # [1, 3, R, R]

        def extract(ae: ViTAutoencoder, x: torch.Tensor) -> torch.Tensor:
            with autocast(dev, ae_dtype):
                return ae.extract(x).float()

        with timed("encode"):  # the reference latent: once per video
            ref_latent = extract(models.ae_rgb, ref[:, :, None].expand(-1, -1, clip, -1, -1))
        cached = _LatentCache(extract)
        ldmk_keys = clip_keys(np.asarray(landmark_video), clip)
        mask_keys = clip_keys(np.asarray(masked_frames), clip)
        n_clips = x_l.shape[0]
        step = 1 if use_last_as_reference else batch_size
        image_cond = ref_latent[:, :, :n_xy]
        outputs = []
        bar = tqdm(total=n_clips, desc="MToV clips", unit="clip", disable=not progress)
        for start in range(0, n_clips, step):
            idx = range(start, min(start + step, n_clips))
            b = len(idx)
            with timed("encode"):  # only what the sampler uses, each distinct clip once
                sl = slice(idx.start, idx.stop)
                cond = torch.cat(
                    [
                        cached(models.ae_ldmk, x_l[sl], ldmk_keys[sl]),
                        cached(models.ae_rgb, masked[sl], mask_keys[sl]),
                    ],
                    dim=1,
                )
            with timed("unet"):
                z = ddpm.sample(
                    b,
                    cond,
                    image_cond.expand(b, -1, -1),
                    noised_start=ref_latent.expand(b, -1, -1),
                    start_ratio=start_ratio,
                    generator=[clip_generator(seed, i, dev) for i in idx],
                )
            with timed("decode"), autocast(dev, ae_dtype):
                frames = models.ae_rgb.decode_from_sample(z).float().clamp(-1.0, 1.0)  # [(b*clip), 3, R, R]
            if use_last_as_reference:
                last = frames[-1:, :, None].expand(-1, -1, clip, -1, -1)
                with timed("encode"):
                    image_cond = extract(models.ae_rgb, last)[:, :, :n_xy]
            if size != out_size:
                frames = F.interpolate(
                    frames, size=(out_size, out_size), mode="bilinear", align_corners=False
                )
            outputs.append(frames.cpu() if return_float else to_uint8(frames).cpu())
            bar.update(b)
        bar.close()
    return torch.cat(outputs)[:n].numpy()


# ----------------------------------------------------------------------------------------------- CLI
def _read_landmark_input(
    path: Path, image_hw: tuple[int, int], size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """--landmarks: aligned ``.npy [T, 68, 2]`` (rendered here) or a folder of rendered PNGs.

    Returns (uint8 [T, 3, size, size] landmark video, the [T, 68, 2] landmarks or None).
    """
    from data.motion_align import render_landmarks
    from data.video import read_image

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise UserError(f"no PNG/JPEG landmark frames in {path}")
        imgs = np.stack([read_image(p) for p in files])
        if imgs.shape[1] != imgs.shape[2]:
            raise UserError(f"landmark frames in {path} must be square, got {imgs.shape[1:3]}")
        video = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
        if video.shape[-1] != size:
            video = F.interpolate(video, size=(size, size), mode="bilinear", align_corners=False)
        return video.round().clamp(0, 255).to(torch.uint8).numpy(), None
    from moditalker.fileio import load_npy

    lm = load_npy(path, "aligned landmarks")
    if lm.ndim != 3 or lm.shape[1:] != (68, 2) or lm.shape[0] == 0:
        raise UserError(f"{path}: aligned landmarks must be [T, 68, 2] pixel coordinates, got {lm.shape}")
    if not np.isfinite(lm).all():
        raise UserError(f"{path}: aligned landmarks contain NaN or inf")
    return render_landmarks(lm, image_hw, size=size), lm


def _read_reference(args: argparse.Namespace) -> np.ndarray:
    from data.video import read_image, read_video

    if args.ref_video:
        frames, _ = read_video(args.ref_video, fps=args.fps)
        return frames
    folder = Path(args.ref_frames)
    if not folder.is_dir():
        raise UserError(f"reference frames folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UserError(f"no PNG/JPEG frames in {folder}")
    frames = [read_image(p) for p in files]
    if any(f.shape != frames[0].shape for f in frames):
        raise UserError(f"frames in {folder} differ in size")
    return np.stack(frames)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m MToV.sample",
        description="MToV: aligned landmarks + reference video -> talking-head video (noised-start DDIM).",
        epilog="Any config value can also be given as key=value, e.g. sample.eta=0.5 train.lr=1e-4.",
    )
    p.add_argument(
        "--landmarks",
        required=True,
        help="aligned landmarks .npy [T,68,2] (reference-frame pixels) or a folder of rendered landmark PNGs",
    )
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref_video", help="reference video (upper face, background, pose come from it)")
    ref.add_argument("--ref_frames", help="folder of reference frames (PNG/JPEG, sorted by name)")
    p.add_argument(
        "--ref_landmarks",
        default=None,
        help="[T,68,2] .npy of the reference frames' own landmarks, "
        "used for masking below the nose (default: the aligned landmarks; required with PNG landmarks)",
    )
    p.add_argument("--identity_frame", type=int, default=0, help="reference frame used as identity [0]")
    p.add_argument("--out", required=True, help="output folder (video.mp4, frames/, config.yaml)")
    p.add_argument(
        "--config", default=None, help="YAML with model sizes/checkpoints (e.g. configs/mtov_tiny.yaml)"
    )
    p.add_argument(
        "--ae_rgb", default=None, help="RGB autoencoder checkpoint [checkpoints/autoencoder_rgb.pth]"
    )
    p.add_argument(
        "--ae_ldmk", default=None, help="landmark AE checkpoint [checkpoints/autoencoder_motion.pth]"
    )
    p.add_argument("--unet", default=None, help="UNet checkpoint [checkpoints/diffusion_model.pth]")
    p.add_argument(
        "--random_weights", action="store_true", help="no checkpoints: random networks (smoke test)"
    )
    p.add_argument("--batch_size", type=int, default=None, help="16-frame clips per batch [4]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed [0]")
    p.add_argument("--start_ratio", type=float, default=None, help="noised start at t = ratio*1000 [0.25]")
    p.add_argument("--steps", type=int, default=None, help="DDIM schedule length (ratio of it is run) [100]")
    p.add_argument(
        "--use_last_as_reference", action="store_true", help="carry the last frame as next reference"
    )
    p.add_argument("--audio", default=None, help="audio (or video) file muxed into video.mp4")
    p.add_argument(
        "--fps", type=float, default=float(FPS), help=f"frame rate of the reference and output [{FPS}]"
    )
    p.add_argument("--save_frames", action="store_true", help="also write frames/%%05d.png")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="autoencoders in bf16 autocast where the device has bf16 units (auto) or fp32; UNet always fp32",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def _check_sample_config(cfg: DictConfig) -> None:
    """The ``sample`` section after overrides: known keys, right types, a sampler that denoises."""
    if not OmegaConf.is_dict(cfg.get("sample")):
        raise UserError(f"sample must be a mapping of sampler settings, got {cfg.get('sample')!r}")
    try:
        sample = OmegaConf.to_container(cfg.sample, resolve=True)
    except Exception as exc:  # noqa: BLE001 - interpolation errors from the user's YAML
        raise UserError(f"bad sample settings: {exc}") from exc
    known = MODEL_DEFAULTS["sample"]
    unknown = sorted(set(sample) - set(known))
    if unknown:
        raise UserError(f"unknown sample setting(s) {unknown}; known: {', '.join(known)}")
    types = {"batch_size": int, "seed": int, "sampling_timesteps": int, "use_last_as_reference": bool}
    for key, kind in types.items():
        value = sample[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(
                f"sample.{key} must be {'true/false' if kind is bool else 'an integer'}, got {value!r}"
            )
    for key in ("start_ratio", "eta"):
        if isinstance(sample[key], bool) or not isinstance(sample[key], int | float):
            raise UserError(f"sample.{key} must be a number, got {sample[key]!r}")
    if sample["batch_size"] < 1:
        raise UserError(f"sample.batch_size (--batch_size) must be >= 1, got {sample['batch_size']}")
    check_sampling(
        float(sample["start_ratio"]),
        sample["sampling_timesteps"],
        float(sample["eta"]),
        int(cfg.diffusion.timesteps),
    )


def main(argv: Sequence[str] | None = None) -> dict:
    from data.imageops import mask_below_nose, resize_crop
    from data.motion_align import pingpong_indices
    from data.video import write_video
    from moditalker.fileio import check_output, load_npy

    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(repo_path(args.config) if args.config else None, args.overrides, MODEL_DEFAULTS)
    for flag, key in (
        ("batch_size", "batch_size"),
        ("seed", "seed"),
        ("start_ratio", "start_ratio"),
        ("steps", "sampling_timesteps"),
    ):
        if getattr(args, flag) is not None:
            cfg.sample[key] = getattr(args, flag)
    if args.use_last_as_reference:
        cfg.sample.use_last_as_reference = True
    _check_sample_config(cfg)
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise UserError(f"--fps must be a positive number, got {args.fps}")
    out = Path(args.out)
    video_path = check_output(out / "video.mp4", args.overwrite)
    audio = None
    if args.audio:  # read first: a bad file fails now, not after the sampling
        from data.audio import load_audio

        audio = load_audio(args.audio, SAMPLE_RATE)

    ref = _read_reference(args)  # [N, H, W, 3]
    hw = ref.shape[1:3]
    models = load_mtov(args.ae_rgb, args.ae_ldmk, args.unet, cfg, args.device, args.random_weights)
    size = models.resolution
    lm_video, lm = _read_landmark_input(Path(args.landmarks), hw, size)
    n = lm_video.shape[0]
    idx = pingpong_indices(len(ref), n)  # reference played back and forth when shorter
    if args.ref_landmarks:
        mask_lm = load_npy(args.ref_landmarks, "reference landmarks")
        if mask_lm.ndim != 3 or mask_lm.shape[1:] != (68, 2) or len(mask_lm) != len(ref):
            raise UserError(
                f"{args.ref_landmarks}: expected [{len(ref)}, 68, 2] (one per reference frame), "
                f"got {mask_lm.shape}"
            )
        mask_lm = mask_lm[idx]
    elif lm is not None:
        mask_lm = lm
    else:
        raise UserError("PNG landmark frames carry no nose position: pass --ref_landmarks for the masking")
    if not 0 <= args.identity_frame < len(ref):
        raise UserError(f"--identity_frame {args.identity_frame} outside the {len(ref)} reference frames")
    frames = ref[idx]
    masked = resize_crop(mask_below_nose(frames, mask_lm), size).transpose(0, 3, 1, 2)
    ident = resize_crop(ref[args.identity_frame : args.identity_frame + 1], size)[0].transpose(2, 0, 1)
    sc = cfg.sample
    t0 = time.perf_counter()
    video = generate_video(
        models,
        lm_video,
        np.ascontiguousarray(masked),
        np.ascontiguousarray(ident),
        batch_size=int(sc.batch_size),
        seed=int(sc.seed),
        start_ratio=float(sc.start_ratio),
        sampling_timesteps=int(sc.sampling_timesteps),
        use_last_as_reference=bool(sc.use_last_as_reference),
        progress=not args.no_progress,
        eta=float(sc.eta),
        precision=args.precision,
    )
    seconds = time.perf_counter() - t0
    if audio is not None:
        audio = audio[: int(round(n / args.fps * SAMPLE_RATE))]
    hwc = video.transpose(0, 2, 3, 1)
    write_video(video_path, hwc, fps=args.fps, audio=audio, sample_rate=SAMPLE_RATE)
    if args.save_frames:
        from PIL import Image

        from moditalker.fileio import atomic_path

        (out / "frames").mkdir(parents=True, exist_ok=True)
        for i, fr in enumerate(hwc):
            with atomic_path(out / "frames" / f"{i:05d}.png") as tmp:
                Image.fromarray(fr).save(tmp)
    save_config(cfg, out / "config.yaml")
    result = {"video": str(video_path), "frames": n, "seconds": round(seconds, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli_main(main)
