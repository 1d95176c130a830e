"""MToV tri-plane video autoencoder (``ViTAutoencoder``), checkpoint-compatible with the official one.

A clip ``[B, 3, s, H, W]`` in [-1, 1] is patchified (patch ``p``: 8, or 4 at 128 px) and encoded by
a TimeSformer into a dense token grid ``[B, C, s, r, r]`` (``r = H // p``). Three small "quant"
transformers squeeze it onto three planes:

* xy ``[r, r]``: attention along time for every patch location (a learned token appended at the
  end); the output at index 0 (the FIRST FRAME's token, not the appended one) is kept;
* yt ``[s, r]``: attention along rows h for every (t, w); index 0 kept;
* xt ``[s, r]``: attention along columns w for every (t, h); index 0 kept.

Each plane goes through a 1x1 conv to ``embed_dim`` channels and ``tanh``: that is the latent
(``extract`` returns it flattened as ``[B, embed_dim, r*r + s*r + s*r]``, order xy | yt | xt).
Decoding re-expands the planes with 1x1 convs, broadcast-sums them to ``[B, C, s, r, r]``, runs a
TimeSformer and a per-frame transposed conv, and squashes with ``2*sigmoid - 1``.

Sizes come from ``ddconfig`` (``channels``, ``resolution``, ``timesteps``, ``splits``); only the
architecture constants of the official class are fixed here (depth 8, 8 heads x 64 in the
TimeSformers; quant transformers depth 4, 4 heads x ``channels // 8``, MLP 512).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from moditalker.checkpoint import load_strict, read_checkpoint, unwrap_state_dict
from MToV.models.timesformer import TimeSformerDecoder, TimeSformerEncoder

#: The official constructor arguments (``configs/autoencoder/base.yaml`` of the original; the RGB and
#: landmark autoencoders share them).
OFFICIAL_CONFIG: dict = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": False,
        "channels": 384,
        "resolution": 256,
        "timesteps": 16,
        "skip": 1,
        "in_channels": 3,
        "out_ch": 3,
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "splits": 1,
    },
}

ENCODER_DEPTH = 8
QUANT_DEPTH = 4
QUANT_HEADS = 4
QUANT_MLP_DIM = 512


def patch_size_for(resolution: int) -> int:
    """The official rule: patch 8, except 4 at 128 px."""
    return 4 if resolution == 128 else 8


class PreNorm(nn.Module):
    """LayerNorm then ``fn`` (quant-transformer key order ``norm.*``, ``fn.*``)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over [N, L, dim] (keys ``to_qkv``, ``to_out.0``)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = (
            self.to_qkv(x).view(n, length, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, length, self.heads * self.dim_head))

    def forward_first(self, x: torch.Tensor) -> torch.Tensor:
        """The output of token 0 only, [N, L, dim] -> [N, 1, dim]: one query, keys/values of all tokens."""
        n, length, _ = x.shape
        inner = self.heads * self.dim_head
        weight = self.to_qkv.weight  # rows: q | k | v
        if isinstance(weight, torch.Tensor):
            q = nn.functional.linear(x[:, :1], weight[:inner])
            kv = nn.functional.linear(x, weight[inner:])
        else:  # int8 (dynamically quantised): the weight is packed, so project all, keep q of token 0
            qkv = self.to_qkv(x)
            q, kv = qkv[:, :1, :inner], qkv[:, :, inner:]
        q = q.reshape(n, 1, self.heads, self.dim_head)
        kv = kv.reshape(n, length, 2, self.heads, self.dim_head)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, 1, inner))


class MLP(nn.Module):
    """dim -> hidden -> GELU -> dim (keys ``net.0``, ``net.3``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class QuantTransformer(nn.Module):
    """Pre-norm transformer (no final norm) that squeezes one axis of the dense latent."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PreNorm(dim, SelfAttention(dim, heads, dim_head)), PreNorm(dim, MLP(dim, mlp_dim))]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """[N, L, dim] -> [N, L, dim]; ``first_only`` returns the output at index 0 ``[N, dim]``, the
        last layer then computing its query, residual and MLP for that token alone (same numbers,
        about a fifth of the quant work saved: the tri-plane projection keeps only index 0)."""
        layers = list(self.layers)
        for attn, ff in layers[:-1] if first_only else layers:
            x = attn(x) + x
            x = ff(x) + x
        if not first_only:
            return x
        attn, ff = layers[-1]
        y = attn.fn.forward_first(attn.norm(x)) + x[:, :1]
        y = ff(y) + y
        return y[:, 0]


class TokensToFrames(nn.Module):
    """[B, s*r*r, C] tokens -> [(B*s), C, r, r] frames (parameter-free; index 0 of ``to_pixel``)."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        frames = n // (self.r * self.r)
        return x.view(b * frames, self.r, self.r, c).permute(0, 3, 1, 2)


class ViTAutoencoder(nn.Module):
    """Tri-plane TimeSformer video autoencoder (RGB and landmark AEs share this class).

    ``ViTAutoencoder(embed_dim, ddconfig)`` with the official config keys; ``ddconfig`` needs
    ``channels``, ``resolution``, ``timesteps``, ``splits`` (others are accepted and ignored).
    """

    def __init__(self, embed_dim: int, ddconfig: Mapping) -> None:
        super().__init__()
        channels = int(ddconfig["channels"])
        self.res = int(ddconfig["resolution"])
        self.timesteps = int(ddconfig["timesteps"])
        self.splits = int(ddconfig.get("splits", 1))
        if self.splits < 1 or self.timesteps % self.splits:
            raise ValueError(
                f"timesteps {self.timesteps} must be a positive multiple of splits {self.splits}"
            )
        if channels < 8:
            raise ValueError(f"channels must be >= 8 (quant heads are channels // 8 wide), got {channels}")
        self.s = self.timesteps // self.splits
        self.embed_dim = int(embed_dim)
        self.channels = channels
        self.patch_size = patch_size_for(self.res)
        if self.res % self.patch_size:
            raise ValueError(f"resolution {self.res} is not a multiple of the patch size {self.patch_size}")
        self.r = self.res // self.patch_size
        s, r = self.s, self.r

        self.xy_token = nn.Parameter(torch.randn(1, 1, channels))
        self.xt_token = nn.Parameter(torch.randn(1, 1, channels))
        self.yt_token = nn.Parameter(torch.randn(1, 1, channels))
        self.xy_pos_embedding = nn.Parameter(torch.randn(1, s + 1, channels))
        self.xt_pos_embedding = nn.Parameter(torch.randn(1, r + 1, channels))
        self.yt_pos_embedding = nn.Parameter(torch.randn(1, r + 1, channels))
        # Unused by every forward path; kept because the official checkpoints hold it.
        self.register_buffer("coords", torch.linspace(-1, 1, steps=s).unsqueeze(-1))

        self.encoder = TimeSformerEncoder(
            dim=channels,
            num_frames=self.timesteps,
            image_size=self.res,
            patch_size=self.patch_size,
            depth=ENCODER_DEPTH,
        )
        self.decoder = TimeSformerDecoder(dim=channels, num_frames=self.timesteps, depth=ENCODER_DEPTH)
        self.to_pixel = nn.Sequential(
            TokensToFrames(r),
            nn.ConvTranspose2d(channels, 3, kernel_size=self.patch_size, stride=self.patch_size),
        )
        self.act = nn.Sigmoid()

        dim_head = channels // 8
        self.xy_quant_attn = QuantTransformer(channels, QUANT_DEPTH, QUANT_HEADS, dim_head, QUANT_MLP_DIM)
        self.yt_quant_attn = QuantTransformer(channels, QUANT_DEPTH, QUANT_HEADS, dim_head, QUANT_MLP_DIM)
        self.xt_quant_attn = QuantTransformer(channels, QUANT_DEPTH, QUANT_HEADS, dim_head, QUANT_MLP_DIM)

        self.pre_xy = nn.Conv2d(channels, embed_dim, 1)
        self.pre_xt = nn.Conv2d(channels, embed_dim, 1)
        self.pre_yt = nn.Conv2d(channels, embed_dim, 1)
        self.post_xy = nn.Conv2d(embed_dim, channels, 1)
        self.post_xt = nn.Conv2d(embed_dim, channels, 1)
        self.post_yt = nn.Conv2d(embed_dim, channels, 1)

    # ------------------------------------------------------------------ layout helpers
    @property
    def latent_length(self) -> int:
        """Positions of the flattened tri-plane latent: r*r + s*r + s*r (2048 at full size)."""
        return self.r * self.r + 2 * self.s * self.r

    def _check_clip(self, x: torch.Tensor, frames: int) -> None:
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[2] != frames or x.shape[3:] != (self.res, self.res):
            raise ValueError(
                f"expected a clip [B, 3, {frames}, {self.res}, {self.res}], got {tuple(x.shape)}"
            )

    def _squeeze_axis(
        self, seq: torch.Tensor, token: nn.Parameter, pos: nn.Parameter, attn: QuantTransformer
    ) -> torch.Tensor:
        """[N, L, C] -> [N, C]: append the learned token, add positions, attend, keep index 0."""
        n, length, _ = seq.shape
        seq = torch.cat([seq, token.expand(n, 1, -1)], dim=1) + pos[:, : length + 1]
        # Index 0 (the first real token), not the appended token: kept as in the official
        # code because the released checkpoints were trained this way.
        return attn(seq, first_only=True)

    def _planes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clip [B, 3, s, H, W] -> tanh'ed planes xy [B,e,r,r], yt [B,e,s,r], xt [B,e,s,r]."""
        self._check_clip(x, self.s)
        b, s, r, c = x.shape[0], self.s, self.r, self.channels
        tokens = self.encoder(x.transpose(1, 2))  # [B, s*r*r, C], order (t, h, w)
        h = tokens.view(b, s, r, r, c)
        # xy: sequence over t for each (h, w)
        xy = self._squeeze_axis(
            h.permute(0, 2, 3, 1, 4).reshape(b * r * r, s, c), self.xy_token, self.xy_pos_embedding,
            self.xy_quant_attn,
        )  # fmt: skip
        # yt: sequence over h for each (t, w)
        yt = self._squeeze_axis(
            h.permute(0, 1, 3, 2, 4).reshape(b * s * r, r, c), self.yt_token, self.yt_pos_embedding,
            self.yt_quant_attn,
        )  # fmt: skip
        # xt: sequence over w for each (t, h)
        xt = self._squeeze_axis(
            h.reshape(b * s * r, r, c), self.xt_token, self.xt_pos_embedding, self.xt_quant_attn
        )
        xy = xy.view(b, r, r, c).permute(0, 3, 1, 2)
        yt = yt.view(b, s, r, c).permute(0, 3, 1, 2)
        xt = xt.view(b, s, r, c).permute(0, 3, 1, 2)
        return torch.tanh(self.pre_xy(xy)), torch.tanh(self.pre_yt(yt)), torch.tanh(self.pre_xt(xt))

    def _dense(self, xy: torch.Tensor, yt: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """Planes -> dense latent [B, C, s, r, r] (xy over t, yt over h, xt over w)."""
        xy, yt, xt = self.post_xy(xy), self.post_yt(yt), self.post_xt(xt)
        return xy.unsqueeze(2) + yt.unsqueeze(3) + xt.unsqueeze(4)

    # ------------------------------------------------------------------ public API
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Clip [B, 3, s, H, W] -> dense latent [B, channels, s, r, r] (what ``decode`` takes)."""
        return self._dense(*self._planes(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Dense latent [B, channels, s, r, r] -> frames [(B*s), 3, H, W] in (-1, 1), frame-major per clip."""
        return 2 * self.act(self.to_pixel(self.decoder(z))) - 1

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Clip [B, 3, s, H, W] -> tri-plane latent [B, embed_dim, r*r + 2*s*r] (xy | yt | xt).

        The diffusion hot path: only the encoder, the quant transformers and the ``pre_*`` convs run.
        """
        xy, yt, xt = self._planes(x)
        return torch.cat([xy.flatten(2), yt.flatten(2), xt.flatten(2)], dim=-1)

    def split_latent(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, e, r*r + 2*s*r] -> planes xy [B,e,r,r], yt [B,e,s,r], xt [B,e,s,r]."""
        r, s = self.r, self.s
        if latent.dim() != 3 or latent.shape[1] != self.embed_dim or latent.shape[2] != self.latent_length:
            raise ValueError(
                f"expected a latent [B, {self.embed_dim}, {self.latent_length}], got {tuple(latent.shape)}"
            )
        b, e = latent.shape[:2]
        xy, yt, xt = latent.split([r * r, s * r, s * r], dim=-1)
        return xy.reshape(b, e, r, r), yt.reshape(b, e, s, r), xt.reshape(b, e, s, r)

    def decode_from_sample(self, latent: torch.Tensor) -> torch.Tensor:
        """Tri-plane latent [B, e, r*r + 2*s*r] (from ``extract`` or a sampler) -> frames [(B*s), 3, H, W].

        The official version hard-codes s = 16; here s comes from the config.
        """
        return self.decode(self._dense(*self.split_latent(latent)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """[B, 3, splits*s, H, W] -> (reconstruction [(B*splits*s), 3, H, W], 0.0).

        The time axis is cut into ``splits`` clips of ``s`` frames, stacked on the batch axis.
        """
        self._check_clip(x, self.splits * self.s)
        b, c, _, hh, ww = x.shape
        if self.splits > 1:
            x = (
                x.reshape(b, c, self.splits, self.s, hh, ww)
                .transpose(1, 2)
                .reshape(b * self.splits, c, self.s, hh, ww)
            )
        return self.decode(self.encode(x)), 0.0


def load_autoencoder_weights(
    model: ViTAutoencoder, path: str | Path, what: str = "autoencoder"
) -> ViTAutoencoder:
    """Load an official-layout checkpoint (plain state_dict; ``{"model"|"state_dict": ...}`` also
    accepted) into ``model`` strictly, turning a missing file or a size/key mismatch into a UserError."""
    state = unwrap_state_dict(read_checkpoint(path, what), path)
    sizes = (
        f"embed_dim={model.embed_dim}, channels={model.channels}, resolution={model.res}, "
        f"timesteps={model.timesteps}, splits={model.splits}"
    )
    return load_strict(model, state, path, f"{what} checkpoint", sizes)
