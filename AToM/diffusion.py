"""AToM Gaussian diffusion: cosine schedule, x0 objective with velocity loss, DDIM + CFG sampling,
and EDGE-style inpainting (used to chain windows for audio of any length)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from AToM.model import EncodedConditions, MotionDecoder, prob_mask_like

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "p2_loss_weight",
)

LOSS_WEIGHT = 7.5  # weight of the x0 reconstruction loss
VELOCITY_LOSS_WEIGHT = 1.5  # weight of the first-difference (velocity) loss

#: How the sampler evaluates classifier-free guidance (``guidance_mode``); all give the same numbers
#: up to float rounding and use the RNG identically:
#: ``"auto"`` (default): conditions encoded once per sampling call, conditional and unconditional
#: decoder passes batched on GPUs, two passes on the CPU (see ``MotionDecoder.guided_decode``);
#: ``"batched"`` / ``"two_pass"``: that choice forced on any device;
#: ``"original"``: the original's pattern, two full forward passes per step (unconditional, then
#: conditional), each re-encoding audio and reference (the benchmark's ``faithful`` mode).
GUIDANCE_MODES = ("auto", "batched", "two_pass", "original")
_BATCHED = {"auto": None, "batched": True, "two_pass": False}


def check_guidance_mode(guidance_mode: str) -> str:
    if guidance_mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {guidance_mode!r}")
    return guidance_mode


@dataclass
class RawConditions:
    """The conditions of the ``"original"`` guidance mode: not encoded, re-encoded at every pass."""

    face: Tensor
    cond: Tensor


def make_beta_schedule(schedule: str, n_timestep: int, cosine_s: float = 8e-3) -> np.ndarray:
    """Betas in float64: Nichol-Dhariwal cosine schedule (clipped to 0.999), or linear."""
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "linear":
        return np.linspace(1e-4**0.5, 2e-2**0.5, n_timestep, dtype=np.float64) ** 2
    raise ValueError(f"unknown schedule {schedule!r}; use 'cosine' or 'linear'")


def _gather(buf: Tensor, t: Tensor, ndim: int) -> Tensor:
    """``buf[t]`` shaped ``[B, 1, ..., 1]`` to broadcast over a rank-``ndim`` tensor."""
    return buf.gather(0, t).reshape(-1, *([1] * (ndim - 1)))


def ddim_times(n_timestep: int, steps: int) -> list[tuple[int, int]]:
    """(time, time_next) pairs: ``linspace(-1, n-1, steps+1)`` truncated to int, reversed."""
    times = torch.linspace(-1, n_timestep - 1, steps=steps + 1).int().tolist()[::-1]
    return list(zip(times[:-1], times[1:]))


class GaussianDiffusion(nn.Module):
    """Wraps a ``MotionDecoder``: schedule buffers, ``q_sample``, ``p_losses``, ``ddim_sample``."""

    def __init__(
        self,
        model: MotionDecoder,
        horizon: int,
        repr_dim: int,
        schedule: str = "cosine",
        n_timestep: int = 1000,
        predict_epsilon: bool = False,
        loss_type: str = "l2",
        use_p2: bool = False,
        cond_drop_prob: float = 0.25,
        guidance_weight: float = 2.0,
        clip_denoised: bool = True,
    ):
        super().__init__()
        self.model = model
        self.horizon, self.repr_dim = horizon, repr_dim
        self.n_timestep = int(n_timestep)
        self.predict_epsilon = predict_epsilon
        self.cond_drop_prob = cond_drop_prob
        self.guidance_weight = guidance_weight
        self.clip_denoised = clip_denoised
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"unknown loss_type {loss_type!r}; use 'l1' or 'l2'")
        self.loss_type = loss_type
        # Betas come from a float64 schedule cast to float32; everything else is derived in float32.
        betas = torch.tensor(make_beta_schedule(schedule, n_timestep), dtype=torch.float32)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        p2_gamma = 0.5 if use_p2 else 0.0
        values = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            "p2_loss_weight": (1 + ac / (1 - ac)) ** -p2_gamma,
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, values[name])

    # ------------------------------------------------------------------ training
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sample ``x_t ~ q(x_t | x_0)``."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_start.dim()) * x_start
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start.dim()) * noise
        )

    def _loss(self, pred: Tensor, target: Tensor) -> Tensor:
        fn = F.mse_loss if self.loss_type == "l2" else F.l1_loss
        return fn(pred, target, reduction="none")

    def p_losses(
        self,
        x_start: Tensor,
        x_pos: Tensor | None,
        face: Tensor,
        cond: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        """``7.5 * mse(x0_hat, x0) + 1.5 * mse(velocity)`` with the wrapper's ``cond_drop_prob``.

        ``mask [B, T]`` (optional, bool) restricts both losses to valid frames (padded short clips);
        a velocity term counts when both of its frames are valid. Without a mask this is the
        original's plain mean. Returns ``(total, extras)``; extras holds the two weighted terms,
        ``model_out`` and the ``keep_mask`` drawn.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start, t, noise)
        keep = self.model_keep_mask(x_start.shape[0], x_start.device)
        model_out = self.model.decode(x_noisy, t, self.model.encode_conditions(face, cond, keep))
        target = noise if self.predict_epsilon else x_start
        w = _gather(self.p2_loss_weight, t, 3)
        loss = self._loss(model_out, target) * w
        v_loss = self._loss(model_out[:, 1:] - model_out[:, :-1], target[:, 1:] - target[:, :-1]) * w
        if mask is None:
            loss, v_loss = loss.mean(), v_loss.mean()
        else:
            m = mask.to(loss.dtype)[..., None]
            mv = m[:, 1:] * m[:, :-1]
            loss = (loss * m).sum() / (m.sum() * loss.shape[-1]).clamp(min=1)
            v_loss = (v_loss * mv).sum() / (mv.sum() * v_loss.shape[-1]).clamp(min=1)
        loss_w, v_loss_w = LOSS_WEIGHT * loss, VELOCITY_LOSS_WEIGHT * v_loss
        total = loss_w + v_loss_w
        extras = {"loss": loss_w, "v_loss": v_loss_w, "model_out": model_out, "keep_mask": keep}
        return total, extras

    def model_keep_mask(self, batch: int, device: torch.device) -> Tensor:
        """The per-sample keep mask for ``cond_drop_prob`` (RNG use as the original)."""
        return prob_mask_like(batch, 1 - self.cond_drop_prob, device)

    def forward(self, x_start: Tensor, x_pos: Tensor | None, face: Tensor, cond: Tensor, **kw) -> tuple:
        """Training entry: random ``t ~ U{0..n-1}`` then ``p_losses``."""
        t = torch.randint(0, self.n_timestep, (x_start.shape[0],), device=x_start.device)
        return self.p_losses(x_start, x_pos, face, cond, t, **kw)

    # ------------------------------------------------------------------ sampling
    def predict_noise_from_start(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t.dim()) * x_t - x0) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.dim()
        )

    def guidance_conditions(
        self, face: Tensor, cond: Tensor, guidance_mode: str = "auto"
    ) -> EncodedConditions | RawConditions:
        """What the guided steps of one sampling call share: the conditions encoded once (conditional
        rows, then null rows), or for ``guidance_mode="original"`` the raw inputs."""
        if check_guidance_mode(guidance_mode) == "original":
            return RawConditions(face, cond)
        return self.model.encode_guidance_conditions(face, cond)

    def guided_x0(
        self,
        x: Tensor,
        t: Tensor,
        enc2: EncodedConditions | RawConditions,
        guidance_weight: float,
        guidance_mode: str = "auto",
    ) -> Tensor:
        """Guided x0 estimate ``uncond + (cond - uncond) * w`` in the call pattern of ``guidance_mode``
        (``enc2`` from :meth:`guidance_conditions` with the same mode)."""
        if check_guidance_mode(guidance_mode) == "original":
            return self.model.guided_forward(None, x, enc2.face, enc2.cond, t, guidance_weight, faithful=True)
        return self.model.guided_decode(x, t, enc2, guidance_weight, batched=_BATCHED[guidance_mode])

    def model_predictions(
        self,
        x: Tensor,
        t: Tensor,
        enc2: EncodedConditions | RawConditions,
        guidance_weight: float,
        guidance_mode: str = "auto",
    ) -> tuple[Tensor, Tensor]:
        """Guided x0 (clamped to [-1, 1] when ``clip_denoised``) and the eps implied by it."""
        x_start = self.guided_x0(x, t, enc2, guidance_weight, guidance_mode)
        if self.clip_denoised:
            x_start = x_start.clamp(-1.0, 1.0)
        return self.predict_noise_from_start(x, t, x_start), x_start

    def ddim_step(
        self,
        x: Tensor,
        time: int,
        time_next: int,
        enc2: EncodedConditions | RawConditions,
        noise_fn: Callable[[Tensor], Tensor],
        eta: float = 1.0,
        guidance_weight: float | None = None,
        guidance_mode: str = "auto",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One DDIM update; returns ``(x_next, x_start, pred_noise)``. ``noise_fn(x)`` is called only
        when ``time_next >= 0`` (the original draws no noise at the last step). ``enc2`` comes from
        :meth:`guidance_conditions` with the same ``guidance_mode``."""
        w = self.guidance_weight if guidance_weight is None else guidance_weight
        t = torch.full((x.shape[0],), time, device=x.device, dtype=torch.long)
        pred_noise, x_start = self.model_predictions(x, t, enc2, w, guidance_mode)
        if time_next < 0:
            return x_start, x_start, pred_noise
        a = self.alphas_cumprod[time]
        a_next = self.alphas_cumprod[time_next]
        sigma = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
        # 1 - a_next - sigma^2 >= 0 exactly, but in float32 it rounds to -6e-8 at (999 -> 799), the first
        # step of 5 (eta 1): the original took the root of that and every landmark was NaN. Clamped at 0
        # (its true value there is 2e-8); wherever it is positive the result is unchanged, bit for bit.
        c = (1 - a_next - sigma**2).clamp(min=0).sqrt()
        noise = noise_fn(x)
        return x_start * a_next.sqrt() + c * pred_noise + sigma * noise, x_start, pred_noise

    @torch.no_grad()
    def ddim_sample(
        self,
        shape: tuple[int, ...] | list[int],
        face: Tensor,
        x_pos: Tensor | None,
        cond: Tensor,
        steps: int = 50,
        eta: float = 1.0,
        guidance_weight: float | None = None,
        generator: torch.Generator | None = None,
        known: tuple[Tensor, Tensor] | None = None,
        progress: bool = False,
        guidance_mode: str = "auto",
    ) -> Tensor:
        """DDIM with classifier-free guidance; returns the final (clamped) x0 estimate.

        RNG order is the original's: ``randn(shape)`` first, then one ``randn_like`` per step except
        the last, from the global RNG or from ``generator``. ``known = (mask, values)`` (broadcastable
        to ``shape``) turns on EDGE-style inpainting: after every step the masked region is replaced
        by ``q_sample(values, time_next)`` and, at the end, by ``values`` itself. ``guidance_mode``
        picks the call pattern of the guidance (:data:`GUIDANCE_MODES`); it changes no number.
        """
        check_guidance_mode(guidance_mode)
        device = self.betas.device
        gen_device = generator.device if generator is not None else device

        def randn(ref_shape) -> Tensor:
            return torch.randn(ref_shape, generator=generator, device=gen_device).to(device)

        enc2 = self.guidance_conditions(face, cond, guidance_mode)
        x = randn(tuple(shape))
        pairs = ddim_times(self.n_timestep, steps)
        if known is not None:
            mask, values = known
            mask = mask.to(device=device, dtype=x.dtype)
            values = values.to(device=device, dtype=x.dtype)
        for time, time_next in tqdm(pairs, desc="DDIM", disable=not progress, leave=False):
            x, _, _ = self.ddim_step(
                x, time, time_next, enc2, lambda r: randn(r.shape), eta, guidance_weight, guidance_mode
            )
            if known is not None:
                if time_next >= 0:
                    t_next = torch.full((x.shape[0],), time_next, device=device, dtype=torch.long)
                    target = self.q_sample(values.expand_as(x), t_next, randn(x.shape))
                else:
                    target = values.expand_as(x)
                x = mask * target + (1 - mask) * x
        return x
