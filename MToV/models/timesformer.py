"""TimeSformer blocks of the MToV video autoencoder (divided space-time attention, rotary positions).

State-dict names follow the official checkpoints (``layers.{i}.{0: time, 1: space, 2: ff}.fn.*``,
``frame_rot_emb.inv_freqs``, ``image_rot_emb.scales``) so ``autoencoder_rgb.pth`` loads strictly.
The width of every attention is ``heads * dim_head`` (512 at the defaults), independent of ``dim``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotate adjacent channel pairs by 90 degrees."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotary(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on the first ``sin.shape[-1]`` channels of ``t`` (rest passed through):
    ``t * cos + rotate_pairs(t) * sin``."""
    d = sin.shape[-1]
    if d == t.shape[-1]:
        return t * cos + rotate_pairs(t) * sin
    head, rest = t[..., :d], t[..., d:]
    return torch.cat((head * cos + rotate_pairs(head) * sin, rest), dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the sign of ``rotate_pairs`` folded in: (-s0, s1, -s2, s3, ...)."""
    sign = torch.ones(2, dtype=sin.dtype, device=sin.device)
    sign[0] = -1
    return (sin.unflatten(-1, (-1, 2)) * sign).flatten(-2)


def apply_rotary_signed(t: torch.Tensor, ssin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` with a :func:`signed_sin` table: the pair swap is a flip, no negation
    pass over the activations (same numbers: the sign moves from the activations to the table).

    The flipped copy takes ``* ssin`` and ``+ t * cos`` in place: one temporary less, bit for bit the
    same numbers. (A fused ``addcmul_`` is faster still, but its FMA rounds the vectorised part of a
    tensor differently from the tail, so a clip's numbers would depend on the batch it runs in.)"""
    d = ssin.shape[-1]
    head = t if d == t.shape[-1] else t[..., :d]
    out = head.unflatten(-1, (-1, 2)).flip(-1).flatten(-2).mul_(ssin).add_(head * cos)
    return out if d == t.shape[-1] else torch.cat((out, t[..., d:]), dim=-1)


def apply_rotary_complex(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` for a table whose channel pairs share one angle (``cos[2i] == cos[2i+1]``,
    as :class:`AxialRotaryEmbedding` makes): each pair ``(x0, x1)`` is the complex number ``x0 + i x1``
    times ``table[i] = cos + i sin``, one pass over memory, the same numbers. ``t`` fp32 or fp64 with
    channels last and contiguous (PyTorch has no bf16 complex type)."""
    d = 2 * table.shape[-1]
    head = t if d == t.shape[-1] else t[..., :d]
    out = torch.view_as_real(torch.view_as_complex(head.unflatten(-1, (-1, 2))) * table).flatten(-2)
    return out if d == t.shape[-1] else torch.cat((out, t[..., d:]), dim=-1)


class RotaryTable:
    """A rotary table ``(sin, cos)`` ready to apply to q and k in the activations' dtype: as a complex
    multiply (:func:`apply_rotary_complex`) where the channel pairs share one angle, the dtype has a
    complex type (fp32, fp64) and the table spans the whole head in whole vector lengths, else as
    :func:`apply_rotary_signed`. Both give :func:`apply_rotary`'s numbers bit for bit. (PyTorch's scalar
    complex multiply, which a row that is not a whole number of SIMD vectors falls back to, rounds
    differently from its vectorised one; 8 complex numbers fill an AVX512 vector.) The derived tables
    are made once per dtype and device."""

    def __init__(self, sin: torch.Tensor, cos: torch.Tensor, paired: bool = False) -> None:
        """``paired``: the table's channel pairs share one angle (true of :class:`AxialRotaryEmbedding`
        by construction; said by the caller, so that no values are read: tables may be on ``meta``)."""
        self.sin, self.cos, self.paired = sin, cos, paired
        self._tables: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _complex_ok(self, t: torch.Tensor) -> bool:
        d = self.sin.shape[-1]
        return (
            self.paired
            and t.dtype in (torch.float32, torch.float64)
            and d == t.shape[-1]
            and d % 16 == 0
            and t.stride(-1) == 1
        )

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        use_complex = self._complex_ok(t)
        key = (t.dtype, t.device, use_complex)
        if key not in self._tables:
            if use_complex:
                table = torch.complex(self.cos[..., ::2], self.sin[..., ::2]).to(t.device)
                self._tables[key] = (table,)
            else:  # in the activations' dtype: under bf16 autocast the rotation stays in bf16
                self._tables[key] = (
                    signed_sin(self.sin).to(t.device, t.dtype),
                    self.cos.to(t.device, t.dtype),
                )
        table = self._tables[key]
        return apply_rotary_complex(t, table[0]) if use_complex else apply_rotary_signed(t, *table)


class FrameRotaryEmbedding(nn.Module):
    """1-D rotary table over frame indices 0..n-1 (frequencies duplicated, paired channels rotated).

    The duplicated-then-pair-rotated layout is what the official weights were trained with.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freqs", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(n, device=self.inv_freqs.device, dtype=self.inv_freqs.dtype)
        freqs = pos[:, None] * self.inv_freqs[None, :]
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.sin(), freqs.cos()


class AxialRotaryEmbedding(nn.Module):
    """2-D rotary table over an h x w patch grid with positions in [-1, 1] and log-spaced scales."""

    def __init__(self, dim: int, max_freq: float = 10.0) -> None:
        super().__init__()
        scales = torch.logspace(0.0, math.log(max_freq / 2) / math.log(2), dim // 4, base=2)
        self.register_buffer("scales", scales)

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        dev, dt = self.scales.device, self.scales.dtype
        hs = torch.linspace(-1.0, 1.0, h, device=dev, dtype=dt)[:, None] * self.scales * math.pi
        ws = torch.linspace(-1.0, 1.0, w, device=dev, dtype=dt)[:, None] * self.scales * math.pi
        k = hs.shape[-1]
        rows = hs[:, None, :].expand(h, w, k)
        cols = ws[None, :, :].expand(h, w, k)
        sin = torch.cat((rows.sin(), cols.sin()), dim=-1).reshape(h * w, 2 * k)
        cos = torch.cat((rows.cos(), cols.cos()), dim=-1).reshape(h * w, 2 * k)
        # each frequency drives one adjacent channel pair
        return sin.repeat_interleave(2, dim=-1), cos.repeat_interleave(2, dim=-1)


class FactorAttention(nn.Module):
    """Multi-head self-attention over sequences that the caller has already grouped ([N, L, dim])."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, rot: RotaryTable | tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = (
            self.to_qkv(x).view(n, length, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        )
        if rot is not None:
            rot = rot if isinstance(rot, RotaryTable) else RotaryTable(*rot)
            q, k = rot.apply(q), rot.apply(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, length, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """Gated GELU: split the channels in half, value * gelu(gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class GEGLUFeedForward(nn.Module):
    """dim -> 2*mult*dim -> GEGLU -> mult*dim -> dim (keys ``net.0``, ``net.3``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNormFnFirst(nn.Module):
    """LayerNorm then ``fn``; ``fn`` is registered first (the TimeSformer key order ``fn.*``, ``norm.*``)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), *args, **kwargs)


class _TimeSformerStack(nn.Module):
    """``depth`` x (time attention, space attention, GEGLU FF), all pre-norm and residual."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        attn_dropout: float,
        ff_dropout: float,
        patch_dim: int | None = None,
    ) -> None:
        super().__init__()
        if patch_dim is not None:  # registered first: the official key order
            self.to_patch_embedding = nn.Linear(patch_dim, dim)
        self.frame_rot_emb = FrameRotaryEmbedding(dim_head)
        self.image_rot_emb = AxialRotaryEmbedding(dim_head)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNormFnFirst(dim, FactorAttention(dim, heads, dim_head, attn_dropout)),
                    PreNormFnFirst(dim, FactorAttention(dim, heads, dim_head, attn_dropout)),
                    PreNormFnFirst(dim, GEGLUFeedForward(dim, dropout=ff_dropout)),
                ]
            )
            for _ in range(depth)
        )

    def run(self, x: torch.Tensor, frames: int, hp: int, wp: int) -> torch.Tensor:
        """x: [B, frames*hp*wp, dim] tokens, frame-major then row-major patches."""
        b, _, d = x.shape
        n = hp * wp
        frame_rot = RotaryTable(*self.frame_rot_emb(frames))  # pairs of two angles: apply_rotary_signed
        image_rot = RotaryTable(*self.image_rot_emb(hp, wp), paired=True)  # one angle a pair: complex
        for time_attn, space_attn, ff in self.layers:
            # time: one sequence of `frames` tokens per (batch, patch)
            xt = x.view(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d)
            xt = time_attn(xt, frame_rot)
            x = xt.view(b, n, frames, d).transpose(1, 2).reshape(b, frames * n, d) + x
            # space: one sequence of `n` patches per (batch, frame)
            xs = space_attn(x.reshape(b * frames, n, d), image_rot)
            x = xs.view(b, frames * n, d) + x
            x = ff(x) + x
        return x


class TimeSformerEncoder(_TimeSformerStack):
    """Patchify a video [B, T, C, H, W] and run the TimeSformer stack -> tokens [B, T*hp*wp, dim]."""

    def __init__(
        self,
        *,
        dim: int,
        num_frames: int,
        image_size: int,
        patch_size: int,
        channels: int = 3,
        depth: int = 8,
        heads: int = 8,
        dim_head: int = 64,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ) -> None:
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        super().__init__(dim, depth, heads, dim_head, attn_dropout, ff_dropout, channels * patch_size**2)
        self.patch_size = patch_size
        self.num_frames = num_frames  # informational: rotary positions adapt to any clip length

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, f, c, h, w = video.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the patch size {p}")
        hp, wp = h // p, w // p
        # (b, f, c, hp, p1, wp, p2) -> (b, f, hp, wp, p1, p2, c): patch features ordered (p1 p2 c)
        patches = video.reshape(b, f, c, hp, p, wp, p).permute(0, 1, 3, 5, 4, 6, 2)
        tokens = self.to_patch_embedding(patches.reshape(b, f * hp * wp, p * p * c))
        return self.run(tokens, f, hp, wp)


class TimeSformerDecoder(_TimeSformerStack):
    """TimeSformer stack on a dense latent [B, dim, T, h, w] -> tokens [B, T*h*w, dim]."""

    def __init__(
        self,
        *,
        dim: int,
        num_frames: int,
        depth: int = 8,
        heads: int = 8,
        dim_head: int = 64,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, depth, heads, dim_head, attn_dropout, ff_dropout)
        self.num_frames = num_frames

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, d, f, h, w = z.shape
        tokens = z.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, d)
        return self.run(tokens, f, h, w)
