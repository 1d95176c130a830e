"""PatchGAN discriminators for the MToV autoencoder GAN phase (2D on single frames, 3D on clips).

Both follow the usual N-layer PatchGAN: stride-2 4x4 convs with BatchNorm and LeakyReLU(0.2),
``ndf`` doubling per layer (max 512), a stride-1 conv block and a 1-channel output conv. The
forward returns ``(logits, features)`` where ``features`` are the outputs of every block (the last
being the logits), used for feature matching. No official discriminator weights exist, so only
the behaviour (not the key names) follows the original.
"""

from __future__ import annotations

import torch
from torch import nn


def init_weights(module: nn.Module) -> None:
    """DCGAN-style init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d | nn.Conv3d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class _PatchGAN(nn.Module):
    def __init__(self, conv: type, norm: type, in_channels: int, ndf: int, n_layers: int) -> None:
        super().__init__()
        k, pad = 4, 2
        blocks = [nn.Sequential(conv(in_channels, ndf, k, stride=2, padding=pad), nn.LeakyReLU(0.2, True))]
        nf = ndf
        for _ in range(1, n_layers):
            prev, nf = nf, min(nf * 2, 512)
            blocks.append(
                nn.Sequential(conv(prev, nf, k, stride=2, padding=pad), norm(nf), nn.LeakyReLU(0.2, True))
            )
        prev, nf = nf, min(nf * 2, 512)
        blocks.append(
            nn.Sequential(conv(prev, nf, k, stride=1, padding=pad), norm(nf), nn.LeakyReLU(0.2, True))
        )
        blocks.append(nn.Sequential(conv(nf, 1, k, stride=1, padding=pad)))
        self.blocks = nn.ModuleList(blocks)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return x, feats


class PatchDiscriminator2D(_PatchGAN):
    """PatchGAN on frames [B, C, H, W] -> (logits [B, 1, h, w], block features)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__(nn.Conv2d, nn.BatchNorm2d, in_channels, ndf, n_layers)


class PatchDiscriminator3D(_PatchGAN):
    """PatchGAN on clips [B, C, T, H, W] -> (logits [B, 1, t, h, w], block features)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__(nn.Conv3d, nn.BatchNorm3d, in_channels, ndf, n_layers)
