"""Deep3DFaceRecon coefficient regressor: aligned 224 face crop -> 257 3DMM coefficients.

The network is a torchvision-layout ResNet-50 without its ``fc`` whose pooled 2048-d feature goes
through seven 1x1 convolutions (identity 80, expression 64, texture 80, angles 3, lighting 27,
translation xy 2, z 1), concatenated in that order: ``coeff[0:80]`` id, ``[80:144]`` exp,
``[144:224]`` tex, ``[224:227]`` angles, ``[227:254]`` gamma, ``[254:257]`` translation.
Only the coefficients are needed here, so there is no renderer and no pytorch3d.

Weights: the official ``epoch_20.pth`` is a dict ``{"net_recon": state_dict, "optimizer": ...,
"epoch": ...}`` whose state_dict keys are ``backbone.conv1.weight``, ``backbone.layer1.0.conv1.weight``,
..., ``final_layers.0.weight`` [80, 2048, 1, 1] ... ``final_layers.6.bias`` [1] (the layout
Deep3DFaceRecon_pytorch's ``save_networks`` writes; not checked against the real file in this
repository's tests). Accepted as well: the bare state_dict, keys with a ``net_recon.`` or
``module.`` prefix, and checkpoints without BatchNorm ``num_batches_tracked`` counters.

Input alignment (Deep3DFaceRecon's ``align_img``): the 5 key points from the 68 FAN landmarks are
flipped to y-up with the frame's true height and POS-fitted to the standard template of
``similarity_Lm3D_all.mat``; the frame is resized by ``s = 102 / pos_scale`` (PIL bicubic) and a
224 crop is cut around the fitted centre. The original's preprocessing read the height from the
wrong axis (``_, W, H = im.shape`` on HWC frames gives ``H == 3``; on CHW frames it swaps W and H),
which put the crop outside the image or used the width; here the real height is always used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io as sio
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from tqdm import tqdm

from data.face3d import SIMILARITY_FILE, canonical_face_lm68
from data.geometry import CROP, RESCALE, lm68_to_lm5, pos_fit
from moditalker.asset_content import deep3d_state_dict
from moditalker.assets import default_path, require_asset
from moditalker.checkpoint import load_strict, read_checkpoint
from moditalker.device import resolve_device
from moditalker.errors import UserError, describe

__all__ = ["ReconNet", "FaceReconstructor", "load_lm3d_std", "align_crop"]

HEAD_SIZES = (80, 64, 80, 3, 27, 2, 1)


class ReconNet(nn.Module):
    """ResNet-50 backbone + seven 1x1 heads -> [B, 257] (key layout of Deep3DFaceRecon's net_recon)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet50(weights=None)
        self.backbone.fc = nn.Identity()  # the official backbone has no fc (use_last_fc=False)
        self.final_layers = nn.ModuleList(nn.Conv2d(2048, n, kernel_size=1, bias=True) for n in HEAD_SIZES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, 3, 224, 224] RGB in [0, 1] -> coefficients [B, 257]."""
        feat = self.backbone(x)[:, :, None, None]
        return torch.cat([head(feat) for head in self.final_layers], dim=1).flatten(1)


def load_lm3d_std(bfm_dir: str | Path) -> np.ndarray:
    """The 5-point POS template [5, 3] (eyes, nose, mouth corners) from ``similarity_Lm3D_all.mat``."""
    path = Path(bfm_dir)
    if path.is_dir() or path.suffix != ".mat":
        path = path / SIMILARITY_FILE
    if not path.is_file():
        raise UserError(f"landmark template not found: {path}; see `python -m moditalker.assets check`")
    try:
        lm = np.asarray(sio.loadmat(str(path))["lm"], dtype=np.float64)
    except Exception as exc:
        raise UserError(f"cannot read the 68x3 'lm' array from {path}: {describe(exc)}") from exc
    if lm.shape != (68, 3):
        raise UserError(f"{path}: 'lm' must be [68, 3], got {lm.shape}")
    return lm68_to_lm5(lm)


def align_crop(
    frame: np.ndarray, lm68: np.ndarray, lm3d_std: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Deep3DFaceRecon alignment of one frame: ``(crop uint8 [224, 224, 3], t [2], s, lm68 in crop [68, 2])``.

    ``lm68`` are pixel (x, y-down) landmarks of ``frame [H, W, 3]``; the returned crop landmarks
    are y-down as well. ``t`` (y-up frame coordinates) and ``s`` are the POS crop parameters.
    """
    height, width = frame.shape[:2]
    lm = np.asarray(lm68, dtype=np.float32)
    lm_up = np.stack([lm[:, 0], np.float32(height - 1) - lm[:, 1]], axis=-1)  # true height (bug fixed)
    t, scale = pos_fit(lm68_to_lm5(lm_up), lm3d_std)
    s = RESCALE / scale
    w, h = int(width * s), int(height * s)
    left = int(w / 2 - CROP / 2 + float((t[0] - width / 2) * s))
    up = int(h / 2 - CROP / 2 + float((height / 2 - t[1]) * s))
    img = Image.fromarray(np.ascontiguousarray(frame)).resize((w, h), resample=Image.BICUBIC)
    crop = np.asarray(img.crop((left, up, left + CROP, up + CROP)))
    # where the landmarks land in the crop (pixel-centre convention of the resize), y down
    scale_xy = np.array([w / width, h / height])
    lm_crop = (lm.astype(np.float64) + 0.5) * scale_xy - 0.5 - np.array([left, up])
    return crop, np.asarray(t, dtype=np.float64), float(s), lm_crop


class FaceReconstructor:
    """Regress 257 Deep3DFaceRecon coefficients per frame from frames and their 68 FAN landmarks.

    ``weights`` defaults to ``checkpoints/deep3d/epoch_20.pth`` and ``bfm_dir`` (for
    ``similarity_Lm3D_all.mat``) to ``checkpoints/BFM``. ``random_weights=True`` builds a seeded
    random network instead (tests, ``--random_weights`` smoke runs): its heads are scaled down so
    poses stay small. A missing template in ``bfm_dir`` is then replaced by the synthetic face's.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        bfm_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        random_weights: bool = False,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        bfm_dir = Path(bfm_dir) if bfm_dir is not None else default_path("bfm_similarity").parent
        if random_weights and not (bfm_dir / SIMILARITY_FILE).is_file() and bfm_dir.suffix != ".mat":
            self.lm3d_std = lm68_to_lm5(canonical_face_lm68())
        else:
            self.lm3d_std = load_lm3d_std(bfm_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = ReconNet()
            if random_weights:
                for head in self.net.final_layers:
                    nn.init.normal_(head.weight, std=1e-4)  # small poses: |angle| ~ 0.05 rad
                    nn.init.zeros_(head.bias)
        if not random_weights:
            path = require_asset("deep3d", weights)
            obj = read_checkpoint(path, "Deep3DFaceRecon")
            self._load(deep3d_state_dict(obj, path), path)
        self.net.eval().to(self.device)

    def _load(self, state: dict[str, torch.Tensor], path: Path) -> None:
        for key, value in self.net.state_dict().items():  # old checkpoints lack BatchNorm step counters
            if key.endswith("num_batches_tracked"):
                state.setdefault(key, value)
        load_strict(
            self.net,
            state,
            path,
            "Deep3DFaceRecon checkpoint",
            "ResNet-50 with 257-coefficient heads",
            fix="expected Deep3DFaceRecon_pytorch's epoch_20.pth (keys like backbone.conv1.weight)",
        )

    def align(self, frames: np.ndarray, lm68: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Aligned 224 crops uint8 ``[T, 224, 224, 3]`` with their POS params ``t [T, 2]``, ``s [T]``."""
        frames, lm68 = self._check(frames, lm68)
        crops, ts, ss = [], [], []
        for frame, lm in zip(frames, lm68):
            crop, t, s, _ = align_crop(frame, lm, self.lm3d_std)
            crops.append(crop)
            ts.append(t)
            ss.append(s)
        return np.stack(crops), np.stack(ts), np.asarray(ss)

    @torch.inference_mode()
    def reconstruct(self, frames: np.ndarray, lm68: np.ndarray, progress: bool = False) -> np.ndarray:
        """Frames uint8 ``[T, H, W, 3]`` + FAN landmarks ``[T, 68, 2]`` -> float32 coeffs ``[T, 257]``."""
        frames, lm68 = self._check(frames, lm68)
        out = []
        for i in tqdm(range(0, len(frames), self.batch_size), desc="3DMM", disable=not progress, leave=False):
            crops, _, _ = self.align(frames[i : i + self.batch_size], lm68[i : i + self.batch_size])
            x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            out.append(self.net(x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    @staticmethod
    def _check(frames: np.ndarray, lm68: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames, lm68 = np.asarray(frames), np.asarray(lm68)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise UserError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        if lm68.shape != (frames.shape[0], 68, 2):
            raise UserError(
                f"landmarks must be [{frames.shape[0]}, 68, 2] for these frames, got {lm68.shape}"
            )
        if not np.isfinite(lm68).all():
            raise UserError("landmarks contain NaN or inf; run the landmark detector again")
        return frames, lm68
