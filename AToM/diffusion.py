"""AToM Gaussian diffusion: cosine schedule, x0 objective with velocity loss, DDIM + CFG sampling,
and EDGE-style inpainting (used to chain windows for audio of any length)."""

from __future__ import annotations

import math
from collections.abc import Callable

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

    def model_predictions(
        self, x: Tensor, t: Tensor, enc2: EncodedConditions, guidance_weight: float
    ) -> tuple[Tensor, Tensor]:
        """Guided x0 (clamped to [-1, 1] when ``clip_denoised``) and the eps implied by it."""
        x_start = self.model.guided_decode(x, t, enc2, guidance_weight)
        if self.clip_denoised:
            x_start = x_start.clamp(-1.0, 1.0)
        return self.predict_noise_from_start(x, t, x_start), x_start

    def ddim_step(
        self,
        x: Tensor,
        time: int,
        time_next: int,
        enc2: EncodedConditions,
        noise_fn: Callable[[Tensor], Tensor],
        eta: float = 1.0,
        guidance_weight: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One DDIM update; returns ``(x_next, x_start, pred_noise)``. ``noise_fn(x)`` is called only
        when ``time_next >= 0`` (the original draws no noise at the last step)."""
        w = self.guidance_weight if guidance_weight is None else guidance_weight
        t = torch.full((x.shape[0],), time, device=x.device, dtype=torch.long)
        pred_noise, x_start = self.model_predictions(x, t, enc2, w)
        if time_next < 0:
            return x_start, x_start, pred_noise
        a = self.alphas_cumprod[time]
        a_next = self.alphas_cumprod[time_next]
        sigma = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
        c = (1 - a_next - sigma**2).sqrt()
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
    ) -> Tensor:
        """DDIM with classifier-free guidance; returns the final (clamped) x0 estimate.

        RNG order is the original's: ``randn(shape)`` first, then one ``randn_like`` per step except
        the last, from the global RNG or from ``generator``. ``known = (mask, values)`` (broadcastable
        to ``shape``) turns on EDGE-style inpainting: after every step the masked region is replaced
        by ``q_sample(values, time_next)`` and, at the end, by ``values`` itself.
        """
        device = self.betas.device
        gen_device = generator.device if generator is not None else device

        def randn(ref_shape) -> Tensor:
            return torch.randn(ref_shape, generator=generator, device=gen_device).to(device)

        enc2 = self.model.encode_guidance_conditions(face, cond)
        x = randn(tuple(shape))
        pairs = ddim_times(self.n_timestep, steps)
        if known is not None:
            mask, values = known
            mask = mask.to(device=device, dtype=x.dtype)
            values = values.to(device=device, dtype=x.dtype)
        for time, time_next in tqdm(pairs, desc="DDIM", disable=not progress, leave=False):
            x, _, _ = self.ddim_step(x, time, time_next, enc2, lambda r: randn(r.shape), eta, guidance_weight)
            if known is not None:
                if time_next >= 0:
                    t_next = torch.full((x.shape[0],), time_next, device=device, dtype=torch.long)
                    target = self.q_sample(values.expand_as(x), t_next, randn(x.shape))
                else:
                    target = values.expand_as(x)
                x = mask * target + (1 - mask) * x
        return x
