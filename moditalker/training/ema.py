"""Exponential moving averages of a model's parameters, both kinds the trainers use, side by side.

* :class:`LitEMA` (MToV diffusion, the original's LitEma): decay ``min(decay, (1 + n) / (10 + n))``
  with ``n`` the number of updates so far, so early updates follow the model closely; the averages
  are buffers of the EMA module itself (saved with the accelerate state), buffers are not averaged.
* :class:`ModelEMA` (AToM, the original's EDGE-style EMA): a frozen deep copy of the model, fixed
  decay, parameters lerped in one foreach call, buffers copied; the copy's ``state_dict`` is the
  checkpoint's ``ema_state_dict``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class LitEMA(nn.Module):
    """Shadow copies of ``model``'s floating-point parameters, updated by :meth:`update`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        # buffers s0, s1, ... (dotted parameter names cannot be buffer names); saved with the state
        self.names = [n for n, p in model.named_parameters() if p.dtype.is_floating_point]
        params = dict(model.named_parameters())
        for i, n in enumerate(self.names):
            self.register_buffer(f"s{i}", params[n].detach().clone().float())

    def _buffers_by_name(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"s{i}") for i, n in enumerate(self.names)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current parameters."""
        self.num_updates += 1
        n = float(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        params = dict(model.named_parameters())
        for name, shadow in self._buffers_by_name().items():
            shadow.sub_((1.0 - decay) * (shadow - params[name].detach().float()))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Write the averaged parameters into ``model`` (buffers untouched)."""
        params = dict(model.named_parameters())
        for name, shadow in self._buffers_by_name().items():
            params[name].copy_(shadow.to(params[name].dtype))
        return model

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged parameters (for ``diffusion_model.pth``)."""
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for name, shadow in self._buffers_by_name().items():
            state[name] = shadow.detach().cpu().to(state[name].dtype).clone()
        return state


class ModelEMA:
    """A frozen copy of ``model`` whose parameters follow it with a fixed ``decay`` (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.model.parameters())
        cur_p = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_p)]
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)
