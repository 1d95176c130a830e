"""MToV generation: rendered landmarks + masked reference frames + an identity frame -> frames.

The original's inference path: every non-overlapping 16-frame clip is sampled independently. The
conditions are the landmark-AE latent of the rendered landmark clip and the RGB-AE latent of the
reference frames masked below the nose; the reference is the identity frame repeated over a clip,
whose full tri-plane latent is the SDEdit start (noised to t = start_ratio * 1000 = 250) and whose
xy-plane is the UNet's image condition. DDIM with eta 1 over the last 25 steps of a 100-step
schedule; x0 clamped to [-1, 1]; decoded with the RGB AE.

Two call patterns, with the same noise per clip (``clip_generator(seed, clip)``), so they agree up to
float rounding (``precision="fp32"``):

* :func:`generate_video` (the default everywhere): clips run in batches; the reference latent is
  encoded once per video; only the encoders the sampler needs run (``extract``); a clip whose frames
  were already encoded (a still reference image gives the same masked clip every time) reuses its
  latent (:class:`LatentCache`); each clip draws its noise from its own generator seeded by
  (seed, clip index), so the result does not depend on ``batch_size``; ``torch.inference_mode``;
  bf16 autocast for the autoencoders where the device has bf16 matrix units.
* :func:`generate_video_original`: the original's call pattern, kept for benchmarking: one clip at a
  time, four encodes per clip (the target clip, whose latent is unused, the reference, the
  landmarks, the masked frames), fp32, ``torch.no_grad``.

Any length works: the last partial clip is padded by repeating its last frame and trimmed afterwards.
Both take a ``timer`` (:class:`moditalker.timing.StageTimer`) that records the ``encode``, ``unet``
and ``decode`` stages; by default one built from ``timings`` and the device (wall seconds).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moditalker.device import autocast
from moditalker.errors import UserError
from moditalker.timing import StageTimer
from MToV.diffusion import ddim_times
from MToV.loading import MToVModels, autoencoder_dtype
from MToV.models.autoencoder import ViTAutoencoder

__all__ = [
    "LatentCache",
    "check_sampling",
    "clip_generator",
    "clip_keys",
    "denoising_steps",
    "generate_video",
    "generate_video_original",
    "pad_clips",
    "to_model",
    "to_uint8",
]


def clip_generator(seed: int, clip: int, device: torch.device) -> torch.Generator:
    """The RNG of clip ``clip``: seeded from (seed, clip) only, so batching does not change it."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(clip)]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


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


def to_model(frames: np.ndarray | torch.Tensor, size: int, device: torch.device, name: str) -> torch.Tensor:
    """uint8 [T, 3, S, S] -> float32 [T, 3, size, size] in [-1, 1] on ``device`` (resized if S != size)."""
    x = torch.as_tensor(np.asarray(frames))
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise UserError(f"{name} must be uint8 [T, 3, S, S], got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32) / 127.5 - 1.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def pad_clips(x: torch.Tensor, clip: int) -> torch.Tensor:
    """[T, 3, H, W] -> [n_clips, 3, clip, H, W], repeating the last frame to fill the last clip."""
    pad = (-x.shape[0]) % clip
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
    return x.reshape(-1, clip, *x.shape[1:]).transpose(1, 2)


def clip_keys(frames: np.ndarray, clip: int) -> list[bytes]:
    """One content hash per ``clip``-frame clip of uint8 ``[T, ...]`` frames (the last clip padded by
    repeating its last frame, as :func:`pad_clips`): equal keys = equal clips = equal latents."""
    frames = np.ascontiguousarray(frames)
    keys = []
    for start in range(0, frames.shape[0], clip):
        block = frames[start : start + clip]
        h = hashlib.blake2b(block.tobytes(), digest_size=16)
        h.update(frames[-1].tobytes() * (clip - block.shape[0]))  # the padding frames
        keys.append(h.digest())
    return keys


class LatentCache:
    """Latents by clip content: a clip seen before (a still reference image gives the same masked
    clip every time; a reference video played back and forth repeats clips) is not encoded again.

    ``extract(ae, clips)`` encodes a batch of clips; ``cache(ae, clips, keys)`` returns the latents of
    ``clips`` (keys from :func:`clip_keys`), encoding only the distinct clips not seen before.
    """

    def __init__(self, extract: Callable[[ViTAutoencoder, torch.Tensor], torch.Tensor]) -> None:
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


def _check_frames(landmark_video, masked_frames, identity_frame, target_frames=None) -> int:
    """The number of frames, after checking the inputs' shapes agree (one UserError otherwise)."""
    shape = np.asarray(landmark_video).shape
    n = int(shape[0]) if len(shape) == 4 else -1
    if n <= 0:
        raise UserError(f"landmark_video must be uint8 [T, 3, S, S], got {shape}")
    if np.asarray(masked_frames).shape != shape:
        raise UserError(
            f"masked_frames {np.asarray(masked_frames).shape} and landmark_video "
            f"{shape} must have the same shape [T, 3, S, S]"
        )
    if target_frames is not None and np.asarray(target_frames).shape != shape:
        raise UserError(
            f"target_frames {np.asarray(target_frames).shape} and landmark_video "
            f"{shape} must have the same shape [T, 3, S, S]"
        )
    ident = np.asarray(identity_frame)
    if ident.shape != shape[1:]:
        raise UserError(f"identity_frame must be uint8 {shape[1:]}, got {ident.shape}")
    return n


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
    timer: StageTimer | None = None,
) -> np.ndarray:
    """Generate uint8 ``[T, 3, S, S]`` frames for uint8 ``[T, 3, S, S]`` rendered landmarks and
    masked reference frames and a uint8 ``[3, S, S]`` identity (reference) frame.

    ``use_last_as_reference``: the last generated frame of clip i becomes the image condition of
    clip i+1 (the noised start stays the identity frame's latent, as the original); clips then run
    one after another. Inputs at another size than the autoencoder's are resized, the output is
    returned at the input size S.

    Fast path: ``precision="auto"`` runs the autoencoders (encodes and decode) under bf16 autocast
    where the device has bf16 matrix units, the UNet always in fp32; ``"fp32"`` keeps everything in
    fp32, equal up to float rounding to the original's one-clip-at-a-time call pattern, which is
    :func:`generate_video_original` (same noise, same arguments but ``batch_size``, ``precision``
    and ``use_last_as_reference``, plus the target frames it encodes and never uses).
    ``timings`` (a dict) accumulates seconds under ``encode``, ``unet`` and ``decode``; ``timer`` (a
    :class:`~moditalker.timing.StageTimer`, e.g. one with ``clock=time.process_time``) records them
    instead (default: ``StageTimer(timings, models.device)``; when given, ``timings`` is not used).
    ``return_float`` returns float32 frames in [-1, 1] instead of uint8.
    """
    n = _check_frames(landmark_video, masked_frames, identity_frame)
    ident = np.asarray(identity_frame)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    check_sampling(start_ratio, sampling_timesteps, eta, int(models.config.diffusion.timesteps))
    out_size = int(ident.shape[-1])
    dev, size, clip = models.device, models.resolution, models.clip_frames
    ae_dtype = autoencoder_dtype(precision, dev)
    timed = timer if timer is not None else StageTimer(timings, dev)
    ddpm = models.sampler(sampling_timesteps, eta)
    n_xy = models.ae_rgb.r**2
    with torch.inference_mode():
        x_l = pad_clips(to_model(landmark_video, size, dev, "landmark_video"), clip)
        masked = pad_clips(to_model(masked_frames, size, dev, "masked_frames"), clip)
        ref = to_model(ident[None], size, dev, "identity_frame")  # [1, 3, R, R]

        def extract(ae: ViTAutoencoder, x: torch.Tensor) -> torch.Tensor:
            with autocast(dev, ae_dtype):
                return ae.extract(x).float()

        with timed("encode"):  # the reference latent: once per video
            ref_latent = extract(models.ae_rgb, ref[:, :, None].expand(-1, -1, clip, -1, -1))
        cached = LatentCache(extract)
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


def generate_video_original(
    models: MToVModels,
    landmark_video: np.ndarray,
    masked_frames: np.ndarray,
    identity_frame: np.ndarray,
    target_frames: np.ndarray,
    *,
    seed: int = 0,
    start_ratio: float = 0.25,
    sampling_timesteps: int = 100,
    eta: float = 1.0,
    timings: dict[str, float] | None = None,
    return_float: bool = False,
    progress: bool = False,
    timer: StageTimer | None = None,
) -> np.ndarray:
    """:func:`generate_video` with the original's call pattern (fp32, eager, ``torch.no_grad``): each
    16-frame clip on its own, with four encodes per clip (``target_frames``, the ground-truth frames
    [T, 3, S, S] whose latent the sampler never uses, the reference, the landmarks, the masked
    frames), noised-start DDIM and a decode. Noise per clip as :func:`generate_video`
    (``clip_generator(seed, clip)``), so the two agree up to float rounding with ``precision="fp32"``.
    The benchmark's ``faithful`` mode; ``timings``/``timer``/``return_float`` as in
    :func:`generate_video`. Inputs uint8 [T, 3, S, S] (resized to the autoencoder's size if needed);
    returns uint8 (or float in [-1, 1]) [T, 3, S, S].
    """
    n = _check_frames(landmark_video, masked_frames, identity_frame, target_frames)
    check_sampling(start_ratio, sampling_timesteps, eta, int(models.config.diffusion.timesteps))
    ident = np.asarray(identity_frame)
    out_size = int(ident.shape[-1])
    dev, size, clip = models.device, models.resolution, models.clip_frames
    timed = timer if timer is not None else StageTimer(timings, dev)
    ddpm = models.sampler(sampling_timesteps, eta)
    n_xy = models.ae_rgb.r**2
    outputs = []
    with torch.no_grad():
        x_l = pad_clips(to_model(landmark_video, size, dev, "landmark_video"), clip)
        masked = pad_clips(to_model(masked_frames, size, dev, "masked_frames"), clip)
        target = pad_clips(to_model(target_frames, size, dev, "target_frames"), clip)
        ref = to_model(ident[None], size, dev, "identity_frame")[:, :, None]
        for i in tqdm(range(x_l.shape[0]), desc="MToV clips (original)", disable=not progress):
            with timed("encode"):
                _ = models.ae_rgb.extract(target[i : i + 1])  # encoded by the original, never used
                ref_latent = models.ae_rgb.extract(ref.expand(-1, -1, clip, -1, -1).contiguous())
                z_l = models.ae_ldmk.extract(x_l[i : i + 1])
                z_m = models.ae_rgb.extract(masked[i : i + 1])
            with timed("unet"):
                z = ddpm.sample(
                    1,
                    torch.cat([z_l, z_m], dim=1),
                    ref_latent[:, :, :n_xy],
                    noised_start=ref_latent,
                    start_ratio=start_ratio,
                    generator=[clip_generator(seed, i, dev)],
                )
            with timed("decode"):
                frames = models.ae_rgb.decode_from_sample(z).clamp(-1.0, 1.0)
            if size != out_size:
                frames = F.interpolate(
                    frames, size=(out_size, out_size), mode="bilinear", align_corners=False
                )
            outputs.append(frames.cpu() if return_float else to_uint8(frames).cpu())
    return torch.cat(outputs)[:n].numpy()
