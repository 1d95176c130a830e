"""ArcFace identity embeddings (Deng et al. 2019) for CSIM: an improved ResNet (IResNet) backbone.

Written here after the IResNet design of the ArcFace paper's reference training code (BN-first
residual blocks with PReLU, a BN + dropout + FC + BN "E" output layer, 512-d embedding, 112x112
input in [-1, 1]); parameter names follow the insightface ``arcface_torch`` ``backbone.pth`` files,
so those load strictly (r100 by default, r50/r34/r18 by depth).

Faces are aligned the ArcFace way: a similarity transform of five landmarks (eye centres, nose
tip, mouth corners; from the 68 FAN points) onto the standard 112x112 template.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}

# The ArcFace 112x112 five-point template: left eye, right eye, nose tip, left and right mouth corner.
TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class IBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """``[B, 3, 112, 112]`` RGB in [-1, 1] -> ``[B, 512]`` identity embedding."""

    def __init__(self, depth: int = 100, embedding: int = 512):
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"IResNet depth must be one of {sorted(LAYERS)}, got {depth}")
        self.conv1 = _conv3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (n, width) in enumerate(zip(LAYERS[depth], (64, 128, 256, 512)), start=1):
            blocks = [IBlock(cin, width, 2)] + [IBlock(width, width, 1) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, embedding)
        self.features = nn.BatchNorm1d(embedding, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


def five_points(lm68: np.ndarray) -> np.ndarray:
    """68 landmarks ``[68, 2]`` -> the five ArcFace points ``[5, 2]``."""
    lm68 = np.asarray(lm68, np.float64)
    return np.stack(
        [lm68[36:42].mean(0), lm68[42:48].mean(0), lm68[30], lm68[48], lm68[54]],
    )


def align_faces(frames: np.ndarray, lm68: np.ndarray) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` + landmarks ``[B, 68, 2]`` -> aligned uint8 ``[B, 112, 112, 3]``.

    Frames whose landmarks are NaN (no face) come out black.
    """
    import cv2
    from skimage.transform import SimilarityTransform

    out = np.zeros((len(frames), 112, 112, 3), np.uint8)
    for i, (frame, lm) in enumerate(zip(frames, lm68)):
        if not np.isfinite(lm).all():
            continue
        tform = SimilarityTransform.from_estimate(five_points(lm), TEMPLATE_112)
        out[i] = cv2.warpAffine(np.ascontiguousarray(frame), tform.params[:2], (112, 112), borderValue=0)
    return out


def to_input(faces: np.ndarray, device: torch.device) -> torch.Tensor:
    """Aligned uint8 faces ``[B, 112, 112, 3]`` -> float ``[B, 3, 112, 112]`` in [-1, 1]."""
    x = torch.from_numpy(faces).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
