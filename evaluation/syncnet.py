"""SyncNet (Chung & Zisserman, "Out of time: automated lip sync in the wild", 2016) and the LSE
offset search.

The network is written here after the paper's two-stream design (audio: 13 MFCC x 20 steps = 0.2 s;
video: 5 stacked 224x224 RGB frames); its parameter names are those of ``syncnet_v2.model``
released with the authors' evaluation code, so that file loads strictly. Both streams end in
1024-d embeddings whose Euclidean distance is small when lips and audio are in sync.

LSE protocol (as in that evaluation code, which LSE-C / LSE-D in talking-head papers come from):
video frames are fed as BGR values in [0, 255], audio as MFCCs (python_speech_features defaults,
16 kHz, int16 scale), 4 MFCC steps per 25 fps frame; for every 5-frame window ``i`` the lip
embedding is compared with the audio embeddings of windows ``i + k`` for ``k`` in [-15, 15] (zero
vectors past the ends); ``mdist[k]`` is the mean distance over windows. LSE-D = ``min mdist``,
LSE-C = ``median(mdist) - min mdist``, offset = ``-argmin k`` in frames (positive: the video lags the audio).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VSHIFT = 15  # frames searched on either side
WINDOW = 5  # video frames per SyncNet input
MFCC_PER_FRAME = 4  # 100 Hz MFCC / 25 fps
AUDIO_RATE = 16000


def _conv2d(cin, cout, kernel=3, padding=1):
    return [nn.Conv2d(cin, cout, kernel, 1, padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _conv3d(cin, cout, kernel, stride=(1, 1, 1), padding=(0, 0, 0)):
    return [nn.Conv3d(cin, cout, kernel, stride, padding), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]


def _head() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, 1024)
    )


class SyncNet(nn.Module):
    """``forward_aud([B, 1, 13, 20])`` and ``forward_lip([B, 3, 5, 224, 224])`` -> ``[B, 1024]``."""

    def __init__(self) -> None:
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_conv2d(1, 64),
            nn.MaxPool2d(1, 1),
            *_conv2d(64, 192),
            nn.MaxPool2d(3, (1, 2)),
            *_conv2d(192, 384),
            *_conv2d(384, 256),
            *_conv2d(256, 256),
            nn.MaxPool2d(3, 2),
            *_conv2d(256, 512, (5, 4), 0),
        )
        self.netfcaud = _head()
        self.netcnnlip = nn.Sequential(
            *_conv3d(3, 96, (5, 7, 7), (1, 2, 2)),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            *_conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *_conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *_conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_conv3d(256, 512, (1, 6, 6)),
        )
        self.netfclip = _head()

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(x).flatten(1))


def mfcc(wave: np.ndarray, rate: int = AUDIO_RATE) -> np.ndarray:
    """``[13, N]`` MFCCs at 100 Hz of a float waveform in [-1, 1] (scaled to int16 range first, as
    SyncNet was trained on int16 wav samples)."""
    from python_speech_features import mfcc as psf_mfcc

    return psf_mfcc(np.asarray(wave, np.float64) * 32768.0, rate).T.astype(np.float32)


def lip_windows(frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[T, 3, H, W]`` (T >= 5) -> SyncNet lip input ``[T - 4, 3, 5, 224, 224]`` (BGR, 0..255)."""
    x = frames.float()
    if x.shape[-2:] != (224, 224):
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    x = x.flip(1)  # RGB -> BGR
    return x.unfold(0, WINDOW, 1).permute(0, 1, 4, 2, 3)  # [T-4, 3, H, W, 5] -> [T-4, 3, 5, H, W]


def audio_windows(mfccs: np.ndarray, n: int) -> torch.Tensor:
    """MFCC ``[13, N]`` -> ``[n, 1, 13, 20]``: window ``i`` starts at MFCC step ``4 i``."""
    m = torch.from_numpy(mfccs)
    return torch.stack([m[:, 4 * i : 4 * i + 20] for i in range(n)])[:, None]


def offset_search(lip: torch.Tensor, aud: torch.Tensor, vshift: int = VSHIFT) -> dict[str, float]:
    """The SyncNet offset search on embeddings ``lip [N, D]`` and ``aud [N, D]``.

    Returns ``{"lse_d": min mean distance, "lse_c": median - min, "offset": frames}``.
    """
    lip, aud = lip.float(), aud.float()
    n = len(lip)
    padded = F.pad(aud, (0, 0, vshift, vshift))
    win = 2 * vshift + 1
    idx = torch.arange(n)[:, None] + torch.arange(win)[None]  # [N, win] rows of the padded audio
    dists = F.pairwise_distance(lip[:, None, :].expand(n, win, -1), padded[idx])  # [N, win]
    mdist = dists.mean(0)
    minval, minidx = mdist.min(0)
    return {
        "lse_d": float(minval),
        "lse_c": float(mdist.median() - minval),
        "offset": float(vshift - int(minidx)),
    }
