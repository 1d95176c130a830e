"""MToV generation: rendered landmarks + masked reference frames + an identity frame -> frames.

The original's inference path: every non-overlapping 16-frame clip is sampled independently. The
conditions are the landmark-AE latent of the rendered landmark clip and the RGB-AE latent of the
reference frames masked below the nose; the reference is the identity frame repeated over a clip,
whose full tri-plane latent is the SDEdit start (noised to t = start_ratio * 1000 = 250) and whose
xy-plane is the UNet's image condition. DDIM with eta 1 over the last 25 steps of a 100-step
schedule; x0 clamped to [-1, 1]; decoded with the RGB AE.

Two call patterns, with the same noise per clip (``clip_generator(seed, clip)``), so they agree up to
float rounding (``precision="fp32"``):

* :func:`generate_video` (the default everywhere): clips run in batches through the UNet (the
  autoencoders take one clip per call on the CPU, int8's only device); the reference latent is
  encoded once per video; only the encoders the sampler needs run (``extract``); a clip whose frames
  were already encoded (a still reference image gives the same masked clip every time) reuses its
  latent (:class:`ClipLatentCache`); each clip draws its noise from its own generator seeded by
  (seed, clip index), so the result does not depend on ``batch_size``; ``torch.inference_mode``;
  cheaper arithmetic chosen per device (bf16 autocast of the autoencoders on GPUs; on the CPU what
  :mod:`MToV.calibration` measured faster, by at least 1.15x, than fp32 on this machine: bf16
  autocast or int8 linear layers in the autoencoders, int8 convolutions in the UNet, else fp32).
* :func:`generate_video_original`: the original's call pattern, kept for benchmarking: one clip at a
  time, four encodes per clip (the target clip, whose latent is unused, the reference, the
  landmarks, the masked frames), fp32, ``torch.no_grad``.

Any length works: the last partial clip is padded by repeating its last frame and trimmed afterwards.
The sampler's settings are one :class:`SamplingOptions`; each function takes one ``timer``
(:class:`moditalker.timing.StageTimer`) that records the ``encode``, ``unet`` and ``decode`` stages
(none by default).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moditalker.device import autocast
from moditalker.errors import UserError
from moditalker.timing import StageTimer
from MToV.clip_cache import ClipLatentCache, clip_keys
from MToV.diffusion import ddim_times
from MToV.loading import MToVModels, PrecisionPlan
from MToV.models.autoencoder import ViTAutoencoder

__all__ = [
    "ClipBatch",
    "ClipLatentCache",
    "SamplingOptions",
    "StreamState",
    "check_sampling",
    "clip_generator",
    "clip_keys",
    "denoising_steps",
    "generate_video",
    "generate_video_original",
    "pad_clips",
    "stream_video",
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


@dataclass(frozen=True)
class SamplingOptions:
    """How :func:`stream_video`, :func:`generate_video` and :func:`generate_video_original` sample.

    ``batch_size``: 16-frame clips per UNet batch (the frames do not depend on it); ``seed``: the
    noise of clip i comes from ``clip_generator(seed, i)``; ``start_ratio``: the noised start at
    t = start_ratio * 1000; ``sampling_timesteps``: the DDIM schedule length (the steps below the
    start run); ``eta``: DDIM eta; ``precision``: a name of :data:`MToV.loading.PRECISIONS`
    (``auto``: on the CPU as measured by :mod:`MToV.calibration`) or a
    :class:`~MToV.loading.PrecisionPlan`; ``use_last_as_reference``: each clip's last frame becomes
    the next clip's image condition (clips then run one at a time); ``latent_capacity``: clips per
    autoencoder kept in the condition-latent cache (None: no limit; oldest dropped first).
    """

    batch_size: int = 4
    seed: int = 0
    start_ratio: float = 0.25
    sampling_timesteps: int = 100
    eta: float = 1.0
    precision: str | PrecisionPlan = "auto"
    use_last_as_reference: bool = False
    latent_capacity: int | None = None

    @classmethod
    def from_config(cls, section: Mapping[str, Any], **given: Any) -> SamplingOptions:
        """The options named in a (checked) config section (``sample`` of an MToV config, ``mtov`` of
        the pipeline's; its other keys are not sampler settings) as their types, then ``given``."""
        found = {k: SETTING_TYPES.get(k, _as_is)(section[k]) for k in _FIELDS if k in section}
        return cls(**{**found, **given})

    @property
    def clips_per_batch(self) -> int:
        return 1 if self.use_last_as_reference else self.batch_size

    def check(self, timesteps: int = 1000) -> None:
        """UserError unless the options run (:func:`check_sampling`, a batch size >= 1)."""
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int | np.integer):
            raise UserError(f"batch_size must be an integer, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        check_sampling(self.start_ratio, self.sampling_timesteps, self.eta, timesteps)


_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingOptions))
#: the sampler settings a config holds (the ``sample`` section of an MToV config) and their types:
#: the plain int/float/bool fields of :class:`SamplingOptions` (``precision`` and ``latent_capacity``
#: come from the caller)
SETTING_TYPES: dict[str, type] = {
    k: t for k, t in typing.get_type_hints(SamplingOptions).items() if t in (int, float, bool)
}


def _as_is(value: Any) -> Any:
    return value


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


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [-1, 1] -> uint8 ``round((x + 1) * 127.5)``."""
    return ((frames + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _plan(precision: str | PrecisionPlan, models: MToVModels) -> PrecisionPlan:
    """The arithmetic of ``precision``: a :class:`~MToV.loading.PrecisionPlan` as given (e.g. one a
    caller resolved with :func:`MToV.calibration.resolve_plan`), a name resolved here (``auto`` on the
    CPU by the measured calibration of :mod:`MToV.calibration`, kept per machine)."""
    if isinstance(precision, PrecisionPlan):
        return precision
    from MToV.calibration import resolve_plan

    return resolve_plan(precision, models, models.device).plan


def _check_frames(landmark_video, masked_frames, identity_frame, target_frames=None, model_size=0) -> int:
    """The number of frames, after checking the inputs' shapes agree (one UserError otherwise); the
    landmark video may also be at the model's size ``model_size`` (``[T, 3, R, R]``)."""
    shape = np.asarray(landmark_video).shape
    n = int(shape[0]) if len(shape) == 4 else -1
    if n <= 0:
        raise UserError(f"landmark_video must be uint8 [T, 3, S, S], got {shape}")
    at_model_size = shape[1:] == (3, model_size, model_size)
    if at_model_size and np.asarray(masked_frames).ndim == 4 and len(masked_frames) == n:
        shape = np.asarray(masked_frames).shape  # the other inputs are checked against these
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


@dataclass
class ClipBatch:
    """One batch of clips from :func:`stream_video`: frames ``start .. start + len(frames) - 1``."""

    index: int  # batch b: clips b * batch_size ... (clip b alone with use_last_as_reference)
    start: int
    frames: np.ndarray  # uint8 [n, 3, S, S] (float32 in [-1, 1] with return_float)
    landmarks: np.ndarray  # the uint8 landmark frames it was conditioned on, [n, 3, S, S] or [n, 3, R, R]
    carry: np.ndarray | None  # use_last_as_reference: the next batch's image condition (float32); else None
    encoded: dict[str, tuple[list[bytes], np.ndarray]]  # "rgb"/"ldmk": (keys, [m, ...]) first encoded here


@dataclass
class StreamState:
    """Where :func:`stream_video` resumes: after ``batches`` finished batches, with the last one's
    ``carry`` and every finished batch's ``encoded`` in order (replayed into the latent cache, so the
    remaining batches are computed exactly as in an uninterrupted stream)."""

    batches: int = 0
    carry: np.ndarray | None = None
    encoded: Iterable[dict[str, tuple[Sequence[bytes], np.ndarray]]] = ()


class _BatchSampler:
    """The state of one :func:`stream_video` (networks in the chosen arithmetic, the reference latent,
    the latent cache, the image condition); :meth:`run` makes batch b. Built under inference mode.

    On the CPU (the only device int8 runs on) the autoencoders take one clip per call: int8's
    activation scales are per call, so a clip's frames do not depend on its batch, and in every
    precision a batch is slower per clip there (full size, 2 threads: bf16 encode 6.7 s per clip alone,
    8.2 s in a batch of 4; fp32 10.9 / 11.5 s). The UNet stays batched (0.56 -> 0.48 s per clip and
    pass in a batch of 4)."""

    def __init__(self, models, ident, options, timer, return_float, resume) -> None:
        self.options, self.timed, self.return_float, self.ident = options, timer, return_float, ident
        self.dev, self.size, self.clip = models.device, models.resolution, models.clip_frames
        plan = _plan(options.precision, models)
        self.ae_dtype, self.per_clip = plan.autoencoder_dtype, self.dev.type == "cpu"
        self.ae_rgb, self.ae_ldmk = models.autoencoders(plan)
        self.ddpm = models.sampler(options.sampling_timesteps, options.eta, plan)
        self.n_xy = self.ae_rgb.r**2
        ref = to_model(ident[None], self.size, self.dev, "identity_frame")  # [1, 3, R, R]
        with timer("encode"):  # the reference latent: once per video
            self.ref_latent = self.extract(self.ae_rgb, ref[:, :, None].expand(-1, -1, self.clip, -1, -1))
        self.cached = ClipLatentCache(self.extract, capacity=options.latent_capacity)
        aes = {"rgb": self.ae_rgb, "ldmk": self.ae_ldmk}
        for encoded in resume.encoded:  # the cache as the finished batches left it
            for name, (keys, latents) in encoded.items():
                latents = torch.as_tensor(np.asarray(latents), device=self.dev)
                self.cached.restore(aes[name], list(keys), latents)
        self.image_cond = self.ref_latent[:, :, : self.n_xy]
        if resume.carry is not None:
            self.image_cond = torch.as_tensor(np.asarray(resume.carry), device=self.dev)

    def extract(self, ae: ViTAutoencoder, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.dev, self.ae_dtype):
            if self.per_clip:
                return torch.cat([ae.extract(c).float() for c in x.split(1)])
            return ae.extract(x).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with autocast(self.dev, self.ae_dtype):
            if self.per_clip:
                return torch.cat([self.ae_rgb.decode_from_sample(c).float() for c in z.split(1)])
            return self.ae_rgb.decode_from_sample(z).float()

    def conditions(self, conditions, f0: int, f1: int) -> tuple[np.ndarray, torch.Tensor]:
        """The landmark frames of frames f0 .. f1 - 1 and their condition latents (each distinct clip
        encoded once)."""
        size, clip, shape = self.size, self.clip, self.ident.shape
        lv, mk = (np.asarray(a) for a in conditions(f0, f1))
        if mk.shape != (f1 - f0, *shape) or lv.shape not in (mk.shape, (f1 - f0, 3, size, size)):
            raise UserError(
                f"conditions({f0}, {f1}) gave landmark frames {lv.shape} and masked frames {mk.shape}; "
                f"both must be uint8 [{f1 - f0}, {', '.join(map(str, shape))}] (the landmark "
                f"frames may be [{f1 - f0}, 3, {size}, {size}], the model's size)"
            )
        x_l = pad_clips(to_model(lv, size, self.dev, "landmark_video"), clip)
        masked = pad_clips(to_model(mk, size, self.dev, "masked_frames"), clip)
        with self.timed("encode"):  # only what the sampler uses, each distinct clip once
            ldmk = self.cached(self.ae_ldmk, x_l, clip_keys(lv, clip))
            return lv, torch.cat([ldmk, self.cached(self.ae_rgb, masked, clip_keys(mk, clip))], dim=1)

    def run(self, index: int, conditions, n: int) -> ClipBatch:
        """Batch ``index`` of an ``n``-frame video."""
        opt, clip, step = self.options, self.clip, self.options.clips_per_batch
        idx = range(index * step, min((index + 1) * step, -(-n // clip)))
        b, f0, f1 = len(idx), idx.start * clip, min(idx.stop * clip, n)
        lv, cond = self.conditions(conditions, f0, f1)
        with self.timed("unet"):
            z = self.ddpm.sample(
                b,
                cond,
                self.image_cond.expand(b, -1, -1),
                noised_start=self.ref_latent.expand(b, -1, -1),
                start_ratio=opt.start_ratio,
                generator=[clip_generator(opt.seed, i, self.dev) for i in idx],
            )
        with self.timed("decode"):
            frames = self.decode(z).clamp(-1.0, 1.0)  # [(b*clip), 3, R, R]
        if opt.use_last_as_reference:
            last = frames[-1:, :, None].expand(-1, -1, clip, -1, -1)
            with self.timed("encode"):
                self.image_cond = self.extract(self.ae_rgb, last)[:, :, : self.n_xy]
        out_size = int(self.ident.shape[-1])
        if self.size != out_size:
            frames = F.interpolate(frames, size=(out_size, out_size), mode="bilinear", align_corners=False)
        frames = (frames if self.return_float else to_uint8(frames))[: f1 - f0].cpu().numpy()
        encoded: dict[str, tuple[list[bytes], list[torch.Tensor]]] = {}
        for ae, key, latent in self.cached.take_added():
            keys, latents = encoded.setdefault("rgb" if ae is self.ae_rgb else "ldmk", ([], []))
            keys.append(key)
            latents.append(latent)
        carry = self.image_cond.cpu().numpy() if opt.use_last_as_reference else None
        stacked = {k: (keys, torch.stack(lat).cpu().numpy()) for k, (keys, lat) in encoded.items()}
        return ClipBatch(index, f0, frames, lv, carry, stacked)


def stream_video(
    models: MToVModels,
    conditions: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
    n_frames: int,
    identity_frame: np.ndarray,
    options: SamplingOptions = SamplingOptions(),
    *,
    on_batch: Callable[[ClipBatch], None],
    progress: bool = True,
    return_float: bool = False,
    timer: StageTimer | None = None,
    resume: StreamState | None = None,
) -> int:
    """:func:`generate_video` batch by batch: ``on_batch`` gets each :class:`ClipBatch` as it is made,
    so nothing of the video's length is held; returns the number of frames generated.

    ``conditions(start, stop)`` gives the uint8 ``[stop - start, 3, S, S]`` landmark frames and masked
    reference frames of frames ``start .. stop - 1`` (landmark frames at the model's size R, drawn as
    the trainers draw them (:func:`MToV.conditions.condition_settings`), go to the network as they are;
    at S they are resized); it is called once per batch, when the batch is generated. Batch b covers
    clips ``b * batch_size ...`` (one clip per batch with ``use_last_as_reference``); the frames equal
    :func:`generate_video`'s (which is this stream, collected). ``resume`` (:class:`StreamState`)
    starts after finished batches. ``timer``: as in :func:`generate_video`.
    """
    n, ident = int(n_frames), np.asarray(identity_frame)
    if n < 1:
        raise UserError(f"n_frames must be >= 1, got {n}")
    options.check(int(models.config.diffusion.timesteps))
    resume = resume if resume is not None else StreamState()
    n_clips = -(-n // models.clip_frames)
    n_batches = -(-n_clips // options.clips_per_batch)
    first = min(n, int(resume.batches) * options.clips_per_batch * models.clip_frames)
    timer = timer if timer is not None else StageTimer(None, models.device)
    with (
        torch.inference_mode(),
        tqdm(total=n, initial=first, desc="MToV", unit="frame", disable=not progress) as bar,
    ):
        sampler = _BatchSampler(models, ident, options, timer, return_float, resume)
        for index in range(int(resume.batches), n_batches):
            batch = sampler.run(index, conditions, n)
            bar.update(len(batch.frames))
            on_batch(batch)
    return n - first


def generate_video(
    models: MToVModels,
    landmark_video: np.ndarray,
    masked_frames: np.ndarray,
    identity_frame: np.ndarray,
    options: SamplingOptions | None = None,
    *,
    progress: bool = True,
    return_float: bool = False,
    timer: StageTimer | None = None,
    **settings: Any,
) -> np.ndarray:
    """Generate uint8 ``[T, 3, S, S]`` frames for uint8 ``[T, 3, S, S]`` rendered landmarks and
    masked reference frames and a uint8 ``[3, S, S]`` identity (reference) frame.

    ``options`` (:class:`SamplingOptions`, default its defaults): the sampler's settings; keyword
    ``settings`` named as its fields replace single ones (``generate_video(m, lv, mk, ident, seed=3)``).
    ``use_last_as_reference``: the last generated frame of clip i becomes the image condition of
    clip i+1 (the noised start stays the identity frame's latent, as the original); clips then run
    one after another. Inputs at another size than the autoencoder's are resized, the output is
    returned at the input size S; the landmark video may be at the autoencoder's size R instead
    (``[T, 3, R, R]``, rendered as the trainers do: :func:`MToV.conditions.condition_settings`), and
    is then used as it is.

    Fast path: ``precision="auto"`` runs the autoencoders (encodes and decode) under bf16 autocast
    on GPUs, and on the CPU the arithmetic :mod:`MToV.calibration` measured faster there (bf16 or
    int8 autoencoders, int8 UNet convolutions, or fp32; tiny networks by the rule of
    :func:`MToV.loading.precision_plan`); a :class:`~MToV.loading.PrecisionPlan` is run as given;
    ``"fp32"`` keeps everything in fp32, equal up to float rounding to the original's
    one-clip-at-a-time call pattern, which is :func:`generate_video_original` (same noise, same
    options but ``batch_size``, ``precision`` and ``use_last_as_reference``, plus the target frames
    it encodes and never uses).
    ``timer`` (a :class:`~moditalker.timing.StageTimer`, e.g. ``StageTimer(timings, device)`` or one
    with ``clock=time.process_time``) records seconds under ``encode``, ``unet`` and ``decode``;
    ``return_float`` returns float32 frames in [-1, 1] instead of uint8.
    """
    options = dataclasses.replace(options or SamplingOptions(), **settings)
    n = _check_frames(landmark_video, masked_frames, identity_frame, model_size=models.resolution)
    lv, mk = np.asarray(landmark_video), np.asarray(masked_frames)
    frames: list[np.ndarray] = []
    stream_video(
        models,
        lambda start, stop: (lv[start:stop], mk[start:stop]),
        n,
        identity_frame,
        options,
        on_batch=lambda batch: frames.append(batch.frames),
        progress=progress,
        return_float=return_float,
        timer=timer,
    )
    return np.concatenate(frames)


def generate_video_original(
    models: MToVModels,
    landmark_video: np.ndarray,
    masked_frames: np.ndarray,
    identity_frame: np.ndarray,
    target_frames: np.ndarray,
    options: SamplingOptions | None = None,
    *,
    progress: bool = False,
    return_float: bool = False,
    timer: StageTimer | None = None,
) -> np.ndarray:
    """:func:`generate_video` with the original's call pattern (fp32, eager, ``torch.no_grad``): each
    16-frame clip on its own, with four encodes per clip (``target_frames``, the ground-truth frames
    [T, 3, S, S] whose latent the sampler never uses, the reference, the landmarks, the masked
    frames), noised-start DDIM and a decode. Noise per clip as :func:`generate_video`
    (``clip_generator(seed, clip)``), so the two agree up to float rounding with ``precision="fp32"``.
    The benchmark's ``faithful`` mode. Of ``options`` it uses ``seed``, ``start_ratio``,
    ``sampling_timesteps`` and ``eta``; ``timer``/``return_float`` as in :func:`generate_video`.
    Inputs uint8 [T, 3, S, S] (resized to the autoencoder's size if needed); returns uint8 (or float
    in [-1, 1]) [T, 3, S, S].
    """
    opt = options or SamplingOptions()
    n = _check_frames(
        landmark_video, masked_frames, identity_frame, target_frames, model_size=models.resolution
    )
    check_sampling(opt.start_ratio, opt.sampling_timesteps, opt.eta, int(models.config.diffusion.timesteps))
    ident = np.asarray(identity_frame)
    out_size = int(ident.shape[-1])
    dev, size, clip = models.device, models.resolution, models.clip_frames
    timed = timer if timer is not None else StageTimer(None, dev)
    ddpm = models.sampler(opt.sampling_timesteps, opt.eta)
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
                    start_ratio=opt.start_ratio,
                    generator=[clip_generator(opt.seed, i, dev)],
                )
            with timed("decode"):
                frames = models.ae_rgb.decode_from_sample(z).clamp(-1.0, 1.0)
            if size != out_size:
                frames = F.interpolate(
                    frames, size=(out_size, out_size), mode="bilinear", align_corners=False
                )
            outputs.append(frames.cpu() if return_float else to_uint8(frames).cpu())
    return torch.cat(outputs)[:n].numpy()
