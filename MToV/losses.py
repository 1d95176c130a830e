"""Losses of the MToV autoencoder stage: LPIPS (VGG16, local weights), hinge GAN, feature matching.

The generator objective is the original's::

    4 * L1(all frames) + 4 * LPIPS(one random frame per clip)
      [+ once step >= disc_start:  -1 * (mean D2d(fake frame) + mean D3d(fake clip))
                                   + 4 * feature matching (L1 on D features, 2D and 3D)]

and the discriminators use hinge losses on the same random frame (2D) and the whole clip (3D).
LPIPS never downloads anything: the linear heads ship inside the ``lpips`` package and the VGG16
backbone is read from a local torchvision state_dict (``checkpoints/lpips/vgg16.pth``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moditalker.assets import require_asset
from moditalker.checkpoint import read_checkpoint, unwrap_state_dict
from moditalker.errors import UserError

# torchvision vgg16.features index ranges of the five LPIPS slices
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def build_lpips(vgg_path: str | Path | None = None, random_backbone: bool = False) -> nn.Module:
    """LPIPS (v0.1, VGG16) with frozen weights, in eval mode.

    ``vgg_path``: torchvision VGG16 ImageNet state_dict (default ``checkpoints/lpips/vgg16.pth``);
    ``random_backbone=True`` keeps a random backbone (tests, smoke runs) and reads no file.
    """
    import lpips

    path = None if random_backbone else require_asset("lpips_vgg16", vgg_path)
    # the package prints banners and torchvision warns about its `pretrained=` call
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        state = unwrap_state_dict(read_checkpoint(path, "LPIPS VGG16"), path, ("state_dict",))
        mapped = {}
        for i, (lo, hi) in enumerate(_VGG_SLICES, start=1):
            for j in range(lo, hi):
                for kind in ("weight", "bias"):
                    key = f"features.{j}.{kind}"
                    if key in state:
                        mapped[f"slice{i}.{j}.{kind}"] = state[key]
        expected = {k for k in model.net.state_dict()}
        if set(mapped) != expected:
            raise UserError(
                f"{path} is not a torchvision VGG16 state_dict "
                f"(missing {sorted(expected - set(mapped))[:3]}); see `python -m moditalker.assets check`"
            )
        model.net.load_state_dict(mapped, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def feature_matching_loss(feats_fake: list[torch.Tensor], feats_real: list[torch.Tensor]) -> torch.Tensor:
    """Sum over the discriminator's intermediate blocks (not the logits) of L1(fake, real.detach()),
    each weighted 4 / (number of blocks - 1) as in the TATS/PVDM discriminators."""
    n = len(feats_fake) - 1
    if n <= 0:
        return feats_fake[0].new_zeros(())
    w = 4.0 / n
    return sum(w * F.l1_loss(f, r.detach()) for f, r in zip(feats_fake[:-1], feats_real[:-1]))


def pick_frames(video: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """video [B, C, T, H, W], idx [B] -> frames [B, C, H, W] (one frame per clip)."""
    return video[torch.arange(video.shape[0], device=video.device), :, idx]


@dataclass
class AELossWeights:
    l1: float = 4.0
    perceptual: float = 4.0
    gan: float = 1.0
    feature_matching: float = 4.0
    foreground: float = 1.0  # L1 weight of the pixels that are not black in the target (1: plain L1)


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the autoencoder stage (see module docstring).

    ``lpips`` may be None when ``weights.perceptual == 0``. The discriminators are passed in so
    the trainer can wrap them (DDP) itself.
    """

    def __init__(self, lpips: nn.Module | None, weights: AELossWeights | None = None) -> None:
        super().__init__()
        self.lpips = lpips
        self.w = weights or AELossWeights()
        if self.lpips is None and self.w.perceptual > 0:
            raise ValueError("perceptual weight > 0 needs an LPIPS module")

    def generator(
        self,
        target: torch.Tensor,
        recon: torch.Tensor,
        frame_idx: torch.Tensor,
        disc2d: nn.Module | None = None,
        disc3d: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """target, recon: [B, C, T, H, W] in [-1, 1]; frame_idx [B]. GAN terms only if discs given."""
        err = (target - recon).abs()
        if self.w.foreground != 1.0:  # sparse images (landmark dots): the lit pixels weigh more
            lit = (target.amax(dim=1, keepdim=True) > -0.9).to(err.dtype)
            weight = 1.0 + (self.w.foreground - 1.0) * lit
            l1 = (err * weight).mean() / weight.mean()
        else:
            l1 = err.mean()
        loss = self.w.l1 * l1
        logs = {"l1": l1.detach()}
        if self.w.perceptual > 0:
            p = self.lpips(
                pick_frames(target, frame_idx).float(), pick_frames(recon, frame_idx).float()
            ).mean()
            loss = loss + self.w.perceptual * p
            logs["lpips"] = p.detach()
        if disc2d is not None and disc3d is not None:
            real_f, fake_f = pick_frames(target, frame_idx), pick_frames(recon, frame_idx)
            with torch.no_grad():
                _, feats_real_2d = disc2d(real_f)
                _, feats_real_3d = disc3d(target)
            logits_2d, feats_fake_2d = disc2d(fake_f)
            logits_3d, feats_fake_3d = disc3d(recon)
            g = -(logits_2d.mean() + logits_3d.mean())
            fm = feature_matching_loss(feats_fake_2d, feats_real_2d) + feature_matching_loss(
                feats_fake_3d, feats_real_3d
            )
            loss = loss + self.w.gan * g + self.w.feature_matching * fm
            logs.update(g_adv=g.detach(), feat_match=fm.detach())
        logs["g_total"] = loss.detach()
        return loss, logs

    @staticmethod
    def discriminator(
        target: torch.Tensor,
        recon: torch.Tensor,
        frame_idx: torch.Tensor,
        disc2d: nn.Module,
        disc3d: nn.Module,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge losses of both discriminators on real vs. (detached) reconstructed frame and clip."""
        recon = recon.detach()
        real_2d, _ = disc2d(pick_frames(target, frame_idx))
        fake_2d, _ = disc2d(pick_frames(recon, frame_idx))
        real_3d, _ = disc3d(target)
        fake_3d, _ = disc3d(recon)
        d2, d3 = hinge_d_loss(real_2d, fake_2d), hinge_d_loss(real_3d, fake_3d)
        return d2 + d3, {"d_2d": d2.detach(), "d_3d": d3.detach()}
