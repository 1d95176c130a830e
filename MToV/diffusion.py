"""DDPM for the MToV tri-plane latent: linear schedule, eps loss, DDIM and noised-start DDIM.

Numbers follow the official training/inference construction: betas
``linspace(sqrt(linear_start), sqrt(linear_end), T)**2`` with every derived buffer computed in
float64 and stored as float32, eps parameterisation, x0 clamped to [-1, 1] while sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Generators = torch.Generator | Sequence[torch.Generator] | None


def _randn(shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype):
    """Normal noise; with a list of generators, row ``i`` comes from ``generator[i]``.

    One generator per sample makes a sample's noise independent of the batch it is in.
    With ``None`` the global torch RNG is used (as the original).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator]
    )


def _extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``a[t]`` and shape it ``[B, 1, ..., 1]`` to broadcast over a ``ndim`` tensor."""
    return a.gather(-1, t).reshape(t.shape[0], *([1] * (ndim - 1)))


def ddim_times(num_timesteps: int, sampling_timesteps: int) -> list[tuple[int, int]]:
    """DDIM (time, time_next) pairs: ``linspace(-1, T-1, S+1)`` truncated to int, reversed."""
    times = torch.linspace(-1, num_timesteps - 1, sampling_timesteps + 1).int().tolist()
    times = list(reversed(times))
    return list(zip(times[:-1], times[1:]))


class DDPM(nn.Module):
    """Gaussian diffusion around a :class:`~MToV.models.DiffusionWrapper` (eps prediction).

    ``image_size`` is the latent resolution r of the UNet config; the sampled latent length is taken
    from ``cond`` (``r*r + 2*frames*r``, 2048 at full size), not from a literal.
    ``loss_type`` defaults to "l2" because the official trainer never passed the YAML's "l1".
    """

    def __init__(
        self,
        model: nn.Module,
        channels: int = 4,
        image_size: int = 32,
        linear_start: float = 0.0015,
        linear_end: float = 0.0195,
        timesteps: int = 1000,
        log_every_t: int = 100,
        w: float = 0.0,
        sampling_timesteps: int = 1000,
        ddim_sampling_eta: float = 1.0,
        loss_type: str = "l2",
        frames: int = 16,
    ) -> None:
        super().__init__()
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        self.model = model
        self.channels = channels
        self.image_size = image_size
        self.frames = frames
        self.log_every_t = log_every_t
        self.w = w  # kept for API parity: the original never applies guidance in MToV
        self.loss_type = loss_type
        self.num_timesteps = int(timesteps)
        self.sampling_timesteps = int(sampling_timesteps)
        self.ddim_sampling_eta = float(ddim_sampling_eta)
        self.l_simple_weight = 1.0
        self.original_elbo_weight = 0.0
        self._register_schedule(linear_start, linear_end)
        # Plain attribute (not a buffer) in the original; zeros, unused by the eps loss.
        self.logvar = torch.zeros(self.num_timesteps)

    @property
    def latent_length(self) -> int:
        return self.image_size**2 + 2 * self.frames * self.image_size

    def _register_schedule(self, linear_start: float, linear_end: float) -> None:
        n = self.num_timesteps
        betas = np.linspace(linear_start**0.5, linear_end**0.5, n, dtype=np.float64) ** 2
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        bufs = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }
        for name, value in bufs.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        # VLB weights for eps parameterisation, from the float32 buffers as the original does;
        # the first entry (posterior variance 0) copies the second.
        lvlb = self.betas**2 / (
            2
            * self.posterior_variance
            * torch.tensor(alphas, dtype=torch.float32)
            * (1 - self.alphas_cumprod)
        )
        lvlb[0] = lvlb[1]
        self.register_buffer("lvlb_weights", lvlb, persistent=False)

    # ------------------------------------------------------------------ training
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """Noise ``x_start`` to step ``t``: ``sqrt(ac_t) x0 + sqrt(1 - ac_t) eps``."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * noise
        )

    def p_losses(
        self,
        x_start: torch.Tensor,
        cond: torch.Tensor,
        image_cond: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eps-prediction loss (mean over channels and positions, then batch) and a log dict."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start, t, noise)
        model_out = self.model(x_noisy, cond, image_cond, t)
        if self.loss_type == "l2":
            per = F.mse_loss(model_out, noise, reduction="none")
        else:
            per = (model_out - noise).abs()
        per = per.mean(dim=tuple(range(1, per.ndim)))
        prefix = "train" if self.training else "val"
        loss_simple = per.mean()
        loss_vlb = (self.lvlb_weights[t] * per).mean()
        loss = self.l_simple_weight * loss_simple + self.original_elbo_weight * loss_vlb
        log = {f"{prefix}/loss_simple": loss_simple, f"{prefix}/loss_vlb": loss_vlb, f"{prefix}/loss": loss}
        return loss, log

    def forward(self, x_start, cond, image_cond, noise=None):  # type: ignore[override]
        """Training loss at uniformly drawn timesteps."""
        t = torch.randint(0, self.num_timesteps, (x_start.shape[0],), device=x_start.device)
        return self.p_losses(x_start, cond, image_cond, t, noise=noise)

    # ------------------------------------------------------------------ sampling
    def ddim_times(self) -> list[tuple[int, int]]:
        """This sampler's schedule: :func:`ddim_times` of its ``num_timesteps`` and ``sampling_timesteps``."""
        return ddim_times(self.num_timesteps, self.sampling_timesteps)

    def model_predictions(self, x, cond, image_cond, t):
        """(raw eps prediction, x0 from it clamped to [-1, 1])."""
        pred_noise = self.model(x, cond, image_cond, t)
        x_start = self.predict_start_from_noise(x, t, pred_noise).clamp(-1.0, 1.0)
        return pred_noise, x_start

    def _ddim_loop(self, img, cond, image_cond, pairs, generator: Generators, progress: bool, callback=None):
        eta = self.ddim_sampling_eta
        b = img.shape[0]
        x_start = img
        for time, time_next in tqdm(pairs, desc="DDIM", disable=not progress, leave=False):
            t = torch.full((b,), time, device=img.device, dtype=torch.long)
            pred_noise, x_start = self.model_predictions(img, cond, image_cond, t)
            if callback is not None:
                callback(time, time_next, img, pred_noise, x_start)
            if time_next < 0:
                img = x_start
                continue
            alpha = self.alphas_cumprod[time]
            alpha_next = self.alphas_cumprod[time_next]
            sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
            c = (1 - alpha_next - sigma**2).sqrt()
            noise = _randn(img.shape, generator, img.device, img.dtype)
            img = x_start * alpha_next.sqrt() + c * pred_noise + sigma * noise
        return img

    @torch.no_grad()
    def ddim_sample(
        self, shape, cond, image_cond, generator: Generators = None, progress=False, callback=None
    ):
        """DDIM over ``sampling_timesteps`` steps from pure noise (global RNG when no generator)."""
        img = _randn(shape, generator, cond.device, cond.dtype)
        return self._ddim_loop(img, cond, image_cond, self.ddim_times(), generator, progress, callback)

    @torch.no_grad()
    def ddim_sample_noised_start(
        self,
        cond,
        image_cond,
        noised_start,
        start_ratio: float = 0.25,
        fix_noise: bool = False,
        generator: Generators = None,
        progress: bool = False,
        callback=None,
    ):
        """SDEdit-style DDIM: noise ``noised_start`` to t = int(T * ratio), then run the DDIM steps
        whose time is below it (25 of 100 at ratio 0.25).

        As in the original, the model is first queried at 249 on a sample noised to step 250, and
        ``fix_noise`` reseeds the global RNG with 1004 before drawing the start noise.
        """
        t_start = int(self.num_timesteps * start_ratio)
        if not 0 < t_start <= self.num_timesteps - 1:
            raise ValueError(f"start_ratio {start_ratio} gives start step {t_start}, outside 1..T-1")
        if fix_noise:
            torch.manual_seed(1004)
        start_noise = _randn(noised_start.shape, generator, noised_start.device, noised_start.dtype)
        t = torch.full((noised_start.shape[0],), t_start, device=noised_start.device, dtype=torch.long)
        img = self.q_sample(noised_start, t, start_noise)
        pairs = [p for p in self.ddim_times() if p[0] < t_start]
        return self._ddim_loop(img, cond, image_cond, pairs, generator, progress, callback)

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        cond: torch.Tensor,
        image_cond: torch.Tensor,
        noised_start: torch.Tensor | None = None,
        start_ratio: float = 0.25,
        fix_noise: bool = False,
        generator: Generators = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample ``[batch_size, channels, L]`` latents (noised start when ``noised_start`` is given).

        ``generator``: None (global RNG, the original), one generator, or one per sample.
        """
        if noised_start is not None:
            return self.ddim_sample_noised_start(
                cond, image_cond, noised_start, start_ratio, fix_noise, generator, progress
            )
        shape = (batch_size, self.channels, cond.shape[-1])
        return self.ddim_sample(shape, cond, image_cond, generator, progress)
