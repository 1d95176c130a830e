"""Tri-plane latent diffusion UNet of MToV (PVDM-style, as used by MoDiTalker).

The denoiser works on a tri-plane video latent ``[B, C, r*r + s*r + s*r]`` (xy-plane ``r x r``,
yt-plane ``s x r``, xt-plane ``s x r``; r = latent resolution, s = frames). Every 2D block (ResBlock,
AttentionBlock, up/down sampling) is applied to each plane separately with shared weights; after
each block the three planes are flattened, concatenated along the position axis and mixed by one
joint 1D self-attention (``input_attns`` / ``mid_attn`` / ``output_attns``), then split again.

Parameter and buffer names follow the official checkpoint layout (``diffusion_model.*`` in
:class:`DiffusionWrapper`), so ``diffusion_model.pth`` loads with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of integer timesteps: cosine half first, then sine half."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 (as the original, so AMP does not change the statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that passes the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class ResBlock(TimestepBlock):
    """LDM residual block: GN-SiLU-conv, time-embedding scale/shift (or add), GN-SiLU-dropout-conv.

    ``up``/``down`` resample (nearest x2 / average pool) both branches inside the block.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of ``[B, C, *spatial]`` with a residual.

    Heads are split before q/k/v ("legacy" order of the original: the qkv channels are laid out
    per head as ``[q_h, k_h, v_h]``). Used both inside the planes (2D) and across the planes (1D).
    """

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        ch = c // self.num_heads
        # [B, heads, T, ch] contiguous views let PyTorch pick its fused (flash) CPU/GPU kernels.
        q, k, v = (
            t.transpose(2, 3).contiguous()
            for t in qkv.reshape(b, self.num_heads, 3 * ch, length).split(ch, 2)
        )
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(ch)) v
        h = h.transpose(2, 3).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


# The joint cross-plane attention has the same structure (and state_dict layout) as the 2D one.
AttentionBlock1D = AttentionBlock


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (the original's init of output convolutions)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


# Other LDM UNet options that official-style YAMLs may carry; they do not change this network
# (no gradient checkpointing / fp16 / spatial transformer variants here), so they are accepted and ignored.
_ACCEPTED_LDM_OPTIONS = {
    "use_checkpoint",
    "use_fp16",
    "num_head_channels",
    "num_heads_upsample",
    "conv_resample",
    "dims",
    "legacy",
    "use_new_attention_order",
}


class UNetModel(nn.Module):
    """Tri-plane UNet predicting the noise of a video latent (constructor args of the official YAML).

    Inputs to :meth:`forward`: noisy latent ``x [B, in_channels, L]``, ``cond [B, 2*in_channels, L]``
    (landmark latent and masked-frame latent), ``image_cond [B, in_channels, >= r*r]`` (only its
    xy-plane part is used, the rest is replaced by zeros) and ``timesteps [B]``. The first conv thus
    sees ``4 * in_channels`` channels (16 in the official model). ``L = r*r + 2*s*r`` with
    ``r = image_size`` and ``s = frames`` (32 and 16 for the official 256x256, 16-frame model).

    ``output_bg_blocks``/``output_bg_attns`` exist only because the official checkpoint holds their
    weights (about 75 M parameters); the forward never runs them.
    ``cond_model=True`` (the ``base_longvid`` YAML) only adds the persistent ``zeros`` buffer
    ``[1, in_channels, L]`` that the official checkpoint for that variant would carry.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: Sequence[int],
        num_res_blocks: int,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = 1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        cond_model: bool = False,
        dropout: float = 0.0,
        frames: int = 16,
        **ldm_options: object,
    ) -> None:
        super().__init__()
        unknown = set(ldm_options) - _ACCEPTED_LDM_OPTIONS
        if unknown:
            raise TypeError(f"UNetModel got unknown arguments {sorted(unknown)}")
        self.image_size = int(image_size)
        self.frames = int(frames)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_heads = num_heads
        self.cond_model = cond_model
        attention_resolutions = [int(a) for a in attention_resolutions]
        channel_mult = [int(m) for m in channel_mult]
        self.num_levels = len(channel_mult)
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, **kw)

        def resample(ch: int, **kw: bool) -> nn.Module:
            if resblock_updown:
                return res(ch, ch, **kw)
            return Upsample(ch) if kw.get("up") else Downsample(ch)

        # x, cond (2 latents) and the padded reference latent are concatenated on channels.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(4 * in_channels, model_channels, 3, padding=1))]
        )
        self.input_attns = nn.ModuleList([nn.Identity()])
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.input_attns.append(AttentionBlock1D(ch, num_heads))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(resample(ch, down=True)))
                self.input_attns.append(AttentionBlock1D(ch, num_heads))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), AttentionBlock(ch, num_heads), res(ch, ch))
        self.mid_attn = AttentionBlock1D(ch, num_heads)

        self.output_blocks = nn.ModuleList()
        self.output_bg_blocks = nn.ModuleList()  # in the checkpoint, never run
        self.output_attns = nn.ModuleList()
        self.output_bg_attns = nn.ModuleList()  # in the checkpoint, never run
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = chans.pop()
                layers = [res(ch + ich, model_channels * mult)]
                bg_layers: list[nn.Module] = [res(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(resample(ch, up=True))
                    bg_layers.append(resample(ch, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self.output_bg_blocks.append(TimestepEmbedSequential(*bg_layers))
                self.output_attns.append(AttentionBlock1D(ch, num_heads))
                self.output_bg_attns.append(AttentionBlock1D(ch, num_heads))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )
        if cond_model:
            self.register_buffer("zeros", torch.zeros(1, in_channels, self.latent_length))

    def freeze_unused(self) -> int:
        """``requires_grad=False`` on the modules the forward never runs (``output_bg_*``); returns how
        many parameters that is. Their values stay in the state_dict; training changes nothing for
        them either way (no gradient, so no optimizer step or weight decay), but DDP refuses
        parameters that get no gradient and would reserve gradient buffers for them."""
        frozen = 0
        for module in (self.output_bg_blocks, self.output_bg_attns):
            for p in module.parameters():
                p.requires_grad_(False)
                frozen += p.numel()
        return frozen

    @property
    def latent_length(self) -> int:
        """Tri-plane latent length ``r*r + 2*s*r`` for the configured resolution and frames."""
        r, s = self.image_size, self.frames
        return r * r + 2 * s * r

    def plane_sizes(self, length: int) -> tuple[int, int]:
        """(r, s) of a tri-plane latent of ``length`` positions.

        The configured (image_size, frames) are used when they fit; otherwise r is solved from the
        length with s = frames (the official code fixes the split at 32/16 whatever image_size says).
        """
        r, s = self.image_size, self.frames
        if r * r + 2 * s * r == length:
            return r, s
        r = math.isqrt(s * s + length) - s
        if r > 0 and r * r + 2 * s * r == length:
            return r, s
        raise ValueError(
            f"latent length {length} is not r*r + 2*{s}*r for any r (UNet image_size={self.image_size}, "
            f"frames={self.frames})"
        )

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        image_cond: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise ``[B, out_channels, L]`` of ``x`` at ``timesteps``."""
        b, _, length = x.shape
        r, s = self.plane_sizes(length)
        n_xy = r * r
        # Only the reference's xy-plane is used; zero padding lives on image_cond's device/dtype
        # (the original allocated it on a hard-coded CUDA device).
        ref = image_cond[:, :, :n_xy]
        ref = torch.cat([ref, ref.new_zeros(b, ref.shape[1], length - n_xy)], dim=2)
        h = torch.cat([x, cond, ref], dim=1)

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        emb2 = torch.cat([emb, emb], dim=0)  # for the yt and xt planes, stacked on the batch axis

        xy = h[:, :, :n_xy].reshape(b, -1, r, r)
        # yt (s x r) and xt (s x r) have the same shape: run them as one batch of 2B.
        txy = h[:, :, n_xy:].reshape(b, -1, 2, s, r).permute(2, 0, 1, 3, 4).reshape(2 * b, -1, s, r)
        planes = (xy, txy)

        def apply(block: TimestepEmbedSequential, p: tuple[torch.Tensor, torch.Tensor]):
            return block(p[0], emb), block(p[1], emb2)

        def joint(attn: nn.Module, p: tuple[torch.Tensor, torch.Tensor]):
            if isinstance(attn, nn.Identity):
                return p
            pxy, pt = p
            c, hh, ww = pt.shape[1:]
            flat = torch.cat([pxy.flatten(2), pt.reshape(2, b, c, hh * ww).permute(1, 2, 0, 3).flatten(2)], 2)
            flat = attn(flat)
            nxy = pxy.shape[2] * pxy.shape[3]
            new_xy = flat[:, :, :nxy].reshape(pxy.shape)
            new_t = flat[:, :, nxy:].reshape(b, c, 2, hh * ww).permute(2, 0, 1, 3).reshape(pt.shape)
            return new_xy, new_t

        skips = []
        for block, attn in zip(self.input_blocks, self.input_attns):
            planes = joint(attn, apply(block, planes))
            skips.append(planes)
        planes = joint(self.mid_attn, apply(self.middle_block, planes))
        for block, attn in zip(self.output_blocks, self.output_attns):
            skip = skips.pop()
            planes = (torch.cat([planes[0], skip[0]], 1), torch.cat([planes[1], skip[1]], 1))
            planes = joint(attn, apply(block, planes))
        out_xy = self.out(planes[0])
        out_t = self.out(planes[1])
        c = out_xy.shape[1]
        out_t = out_t.reshape(2, b, c, s * r).permute(1, 2, 0, 3).reshape(b, c, 2 * s * r)
        return torch.cat([out_xy.reshape(b, c, n_xy), out_t], dim=2)


class Downsample(nn.Module):
    """Strided 3x3 conv downsampling (used when ``resblock_updown=False``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv (used when ``resblock_updown=False``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (checkpoint keys ``diffusion_model.*``) and forwards."""

    def __init__(self, unet: UNetModel, conditioning_key: str | None = None) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = conditioning_key

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor, image_cond: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return self.diffusion_model(x, cond, image_cond, t)
