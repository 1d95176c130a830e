"""The metrics, each fed the aligned protocol chunks of one video pair after the other.

A metric sees :class:`Chunk` objects (uint8 ``[B, 3, 256, 256]`` generated and real frames on the
device, plus FAN landmarks when it needs them), reports per-video values at the end of each video,
and dataset values at the end (by default the mean over videos of the per-video means). Keys ending
in ``_real`` are the same measurement on the real video: they make the report's reference row.

Packages used: torchmetrics (PSNR, SSIM), lpips (LPIPS), pytorch-fid (Inception network, Frechet
distance), cpbd-py312 (CPBD), python_speech_features (SyncNet MFCCs). Written here: the I3D, SyncNet
and ArcFace network definitions, the LSE offset search, the LMD and CSIM protocols, streaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.frechet import RunningGaussian, frechet_of
from evaluation.protocol import VideoPair

PSNR_MAX = 100.0  # dB: identical frames (MSE 0) count as 100 dB instead of infinity
FVD_CLIP = 16
SSIM_WINDOW = 11
FVD_SIZE = 224
MOUTH = slice(48, 68)  # the 20 mouth points of the 68-point layout


@dataclass
class Chunk:
    """Aligned frames of one pair: uint8 ``[B, 3, H, W]`` on the device, landmarks ``[B, 68, 2]``
    (NaN rows: no face) when a metric asked for them."""

    pred: torch.Tensor
    gt: torch.Tensor
    pred_lm: np.ndarray | None = None
    gt_lm: np.ndarray | None = None
    _np: dict = field(default_factory=dict)

    def numpy(self, which: str) -> np.ndarray:
        """``pred`` or ``gt`` as uint8 ``[B, H, W, 3]`` on the CPU (cached)."""
        if which not in self._np:
            self._np[which] = getattr(self, which).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return self._np[which]


class Metric:
    r"""Base: ``start(pair)``, ``update(chunk)`` per chunk, ``finish_video() -> {key: value}``,
    and ``result() -> (metrics, reference)`` over all videos.

    Several processes (:func:`evaluation.scoring.run_metrics` with ranks): each rank scores its share
    of the videos and hands over one :meth:`record` per video; rank 0 :meth:`replay`\ s them in the
    videos' order into a fresh (:meth:`reset`) metric, which then gives the very result one process
    gives (the Frechet metrics replay the features of every chunk into their running statistics)."""

    name = ""
    needs_landmarks = False
    per_video = True

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.keep = False  # hand the per-chunk state over (record) instead of reducing it here

    def reset(self) -> None:
        """Forget every video (before :meth:`replay`)."""
        self.rows = []

    def record(self):
        """What rank 0 needs of the video just finished (after :meth:`finish_video`)."""
        return dict(self.rows[-1])

    def replay(self, record) -> None:
        """Add one video's :meth:`record`, as if it had been scored here."""
        self.rows.append(dict(record))

    def start(self, pair: VideoPair) -> None:
        self.pair = pair

    def update(self, chunk: Chunk) -> None:
        raise NotImplementedError

    def video_values(self) -> dict[str, float]:
        raise NotImplementedError

    def finish_video(self) -> dict[str, float]:
        row = self.video_values()
        self.rows.append(row)
        return row

    def result(self) -> tuple[dict[str, float], dict[str, float]]:
        """Mean over videos (NaN values skipped) of each per-video key; ``*_real`` keys -> reference."""
        metrics: dict[str, float] = {}
        reference: dict[str, float] = {}
        for key in dict.fromkeys(k for row in self.rows for k in row):
            if key.endswith("offset") or key.endswith("offset_real"):
                continue
            values = [row[key] for row in self.rows if key in row and math.isfinite(row[key])]
            mean = float(np.mean(values)) if values else float("nan")
            if key.endswith("_real"):
                reference[key.removesuffix("_real")] = mean
            else:
                metrics[key] = mean
        return metrics, reference


class _FrameMean(Metric):
    """A per-frame value averaged over the frames of a video."""

    def start(self, pair: VideoPair) -> None:
        super().start(pair)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, values: torch.Tensor | np.ndarray) -> None:
        values = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else values
        values = np.asarray(values, np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
        self.counts[key] = self.counts.get(key, 0) + len(values)

    def video_values(self) -> dict[str, float]:
        return {k: (self.sums[k] / self.counts[k] if self.counts[k] else float("nan")) for k in self.sums}


def psnr_frames(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR (dB) of uint8 ``[B, 3, H, W]`` frames, capped at :data:`PSNR_MAX`."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    v = peak_signal_noise_ratio(pred.double(), gt.double(), data_range=255.0, reduction="none", dim=(1, 2, 3))
    return torch.nan_to_num(v, posinf=PSNR_MAX).clamp(max=PSNR_MAX)


def ssim_frames(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM (Gaussian 11x11, sigma 1.5, RGB in [0, 1], mean over channels and over the
    pixels at least 5 px from the border, as Wang et al.'s reference and scikit-image).

    torchmetrics computes the SSIM map; its own mean also covers the reflect-padded border, which
    differs from the common form, so the map is cropped here before averaging.

    On a GPU in float64: there float32 convolutions run in TF32 by default (10-bit mantissa inputs,
    ``torch.backends.cudnn.allow_tf32``), and the variances ``E[x^2] - E[x]^2`` of smooth regions would
    lose to that rounding a good part of SSIM's constant ``C2 = 9e-4``.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    dtype = torch.float64 if pred.device.type == "cuda" else torch.float32
    _, full = structural_similarity_index_measure(
        pred.to(dtype) / 255.0,
        gt.to(dtype) / 255.0,
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=1.0,
        reduction="none",
        return_full_image=True,
    )
    pad = SSIM_WINDOW // 2
    return full[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))


class PSNR(_FrameMean):
    name = "psnr"

    def update(self, chunk: Chunk) -> None:
        self.add("psnr", psnr_frames(chunk.pred, chunk.gt))


class SSIM(_FrameMean):
    name = "ssim"

    def update(self, chunk: Chunk) -> None:
        self.add("ssim", ssim_frames(chunk.pred, chunk.gt))


class LPIPS(_FrameMean):
    """LPIPS v0.1 (AlexNet) per frame, inputs in [-1, 1]."""

    name = "lpips"

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    @torch.inference_mode()
    def update(self, chunk: Chunk) -> None:
        self.add("lpips", self.net(chunk.pred.float() / 127.5 - 1.0, chunk.gt.float() / 127.5 - 1.0))


def _features(net: Callable, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out.flatten(1)


class FID(Metric):
    """Frechet distance of the pool3 features of all generated vs all real frames (input to the
    network: RGB in [0, 1]; pytorch-fid resizes to 299 bilinearly and maps to [-1, 1])."""

    name = "fid"
    per_video = False

    def __init__(self, net: Callable) -> None:
        super().__init__()
        self.net = net
        self.reset()

    @torch.inference_mode()
    def update(self, chunk: Chunk) -> None:
        x = torch.cat([chunk.pred, chunk.gt]).float() / 255.0
        f = _features(self.net, x)
        self._add(f[: len(chunk.pred)], f[len(chunk.pred) :])

    def video_values(self) -> dict[str, float]:
        return {}

    def result(self) -> tuple[dict[str, float], dict[str, float]]:
        return {self.name: frechet_of(self.fake, self.real)}, {}

    def reset(self) -> None:
        super().reset()
        self.fake, self.real = RunningGaussian(), RunningGaussian()
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _add(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        if self.keep:  # the features themselves: rank 0 adds them in the one-process order
            self.chunks.append((fake.detach().float().cpu(), real.detach().float().cpu()))
        else:
            self.fake.update(fake)
            self.real.update(real)

    def record(self):
        chunks, self.chunks = self.chunks, []
        return chunks

    def replay(self, record) -> None:
        for fake, real in record:
            self.fake.update(fake)
            self.real.update(real)


def fvd_preprocess(frames: torch.Tensor, size: int = FVD_SIZE) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> ``[3, T, size, size]`` in [-1, 1]: shorter side resized to ``size``
    (bilinear), centre crop, as the original FVD code."""
    x = frames.float() / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    target = (size, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), size)
    x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x * 2.0 - 1.0).permute(1, 0, 2, 3).contiguous()


class FVD(FID):
    """Frechet distance of I3D-400 embeddings of consecutive non-overlapping 16-frame clips of every
    video (a tail shorter than 16 frames is left out)."""

    name = "fvd"
    per_video = False

    def __init__(self, net: Callable, clip: int = FVD_CLIP) -> None:
        super().__init__(net)
        self.clip = clip

    def start(self, pair: VideoPair) -> None:
        super().start(pair)
        self.buf_p: list[torch.Tensor] = []
        self.buf_g: list[torch.Tensor] = []

    @torch.inference_mode()
    def update(self, chunk: Chunk) -> None:
        self.buf_p.append(chunk.pred)
        self.buf_g.append(chunk.gt)
        p, g = torch.cat(self.buf_p), torch.cat(self.buf_g)
        n = len(p) // self.clip
        if n:
            clips = [fvd_preprocess(p[i * self.clip : (i + 1) * self.clip]) for i in range(n)]
            clips += [fvd_preprocess(g[i * self.clip : (i + 1) * self.clip]) for i in range(n)]
            f = _features(self.net, torch.stack(clips))
            self._add(f[:n], f[n:])
        self.buf_p, self.buf_g = [p[n * self.clip :]], [g[n * self.clip :]]


def mouth_distance(pred_lm: np.ndarray, gt_lm: np.ndarray) -> np.ndarray:
    """Per-frame LMD: mean Euclidean distance (pixels) of the 20 mouth landmarks, each set centred on
    its own mean first (head translation removed). ``[B, 68, 2]`` x 2 -> ``[B]`` (NaN: no face)."""
    p = np.asarray(pred_lm, np.float64)[:, MOUTH]
    g = np.asarray(gt_lm, np.float64)[:, MOUTH]
    p = p - p.mean(1, keepdims=True)
    g = g - g.mean(1, keepdims=True)
    return np.linalg.norm(p - g, axis=-1).mean(-1)


class LMD(_FrameMean):
    """Mouth landmark distance on the 256x256 frames (FAN 68 points); frames where either video has
    no detected face are left out and counted (``lmd_no_face``)."""

    name = "lmd"
    needs_landmarks = True

    def update(self, chunk: Chunk) -> None:
        d = mouth_distance(chunk.pred_lm, chunk.gt_lm)
        self.add("lmd", d)
        self.sums["lmd_no_face"] = self.sums.get("lmd_no_face", 0.0) + float((~np.isfinite(d)).sum())
        self.counts["lmd_no_face"] = 1

    def result(self) -> tuple[dict[str, float], dict[str, float]]:
        metrics, ref = super().result()
        metrics.pop("lmd_no_face", None)
        return metrics, ref


class LSE(Metric):
    """LSE-C / LSE-D with SyncNet (see :mod:`evaluation.syncnet`), on the generated video with its own
    audio track (the real video's when it has none) and on the real video (reference row)."""

    name = "lse"

    def __init__(self, net: torch.nn.Module, device: torch.device, batch: int = 16) -> None:
        super().__init__()
        self.net, self.device, self.batch = net, device, batch

    def start(self, pair: VideoPair) -> None:
        super().start(pair)
        self.carry: dict[str, torch.Tensor | None] = {"pred": None, "gt": None}
        self.lip: dict[str, list[torch.Tensor]] = {"pred": [], "gt": []}
        self.frames = 0

    @torch.inference_mode()
    def update(self, chunk: Chunk) -> None:
        from evaluation.syncnet import WINDOW, lip_windows

        self.frames += len(chunk.pred)
        for which in ("pred", "gt"):
            frames = getattr(chunk, which)
            prev = self.carry[which]
            frames = frames if prev is None else torch.cat([prev, frames])
            if len(frames) >= WINDOW:
                windows = lip_windows(frames)
                for i in range(0, len(windows), self.batch):
                    self.lip[which].append(self.net.forward_lip(windows[i : i + self.batch]).float().cpu())
            self.carry[which] = frames[-(WINDOW - 1) :]

    @torch.inference_mode()
    def _audio_embeddings(self, wave: np.ndarray, n: int) -> torch.Tensor:
        from evaluation.syncnet import audio_windows, mfcc

        windows = audio_windows(mfcc(wave), n)
        out = [
            self.net.forward_aud(windows[i : i + 64].to(self.device)).float().cpu() for i in range(0, n, 64)
        ]
        return torch.cat(out)

    def _audio(self, which: str) -> np.ndarray | None:
        from data.audio import load_audio
        from evaluation.syncnet import AUDIO_RATE
        from moditalker.errors import UserError

        paths = (self.pair.pred, self.pair.gt) if which == "pred" else (self.pair.gt,)
        for path in paths:
            try:
                return load_audio(path, AUDIO_RATE)
            except UserError:
                continue
        return None

    def video_values(self) -> dict[str, float]:
        from evaluation.syncnet import offset_search

        row: dict[str, float] = {}
        for which, suffix in (("pred", ""), ("gt", "_real")):
            wave = self._audio(which)
            lip = torch.cat(self.lip[which]) if self.lip[which] else torch.zeros(0, 1024)
            n = min(self.frames, len(wave) // 640) - 5 if wave is not None else 0
            if n < 1:
                row.update({f"lse_c{suffix}": float("nan"), f"lse_d{suffix}": float("nan")})
                continue
            res = offset_search(lip[:n], self._audio_embeddings(wave, n))
            row.update({f"lse_c{suffix}": res["lse_c"], f"lse_d{suffix}": res["lse_d"]})
            row[f"lse_offset{suffix}"] = res["offset"]
        return row


class CSIM(_FrameMean):
    """Cosine similarity of ArcFace embeddings between the identity frame (the real video's first
    frame with a face) and every generated frame (``csim``) or real frame (``csim_real``); faces
    aligned by five FAN points; frames without a face are left out."""

    name = "csim"
    needs_landmarks = True

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.net, self.device = net, device

    def start(self, pair: VideoPair) -> None:
        super().start(pair)
        self.identity: torch.Tensor | None = None

    def _embed(self, frames: np.ndarray, lms: np.ndarray) -> torch.Tensor:
        from evaluation.arcface import align_faces, to_input

        return F.normalize(self.net(to_input(align_faces(frames, lms), self.device)).float(), dim=1)

    @torch.inference_mode()
    def update(self, chunk: Chunk) -> None:
        if self.identity is None:
            has_face = np.flatnonzero(np.isfinite(chunk.gt_lm).all(axis=(1, 2)))
            if not len(has_face):
                return
            i = has_face[0]
            self.identity = self._embed(chunk.numpy("gt")[i : i + 1], chunk.gt_lm[i : i + 1])[0]
        for which, key in (("pred", "csim"), ("gt", "csim_real")):
            lms = getattr(chunk, f"{which}_lm")
            ok = np.isfinite(lms).all(axis=(1, 2))
            if ok.any():
                emb = self._embed(chunk.numpy(which)[ok], lms[ok])
                self.add(key, emb @ self.identity)

    def video_values(self) -> dict[str, float]:
        row = super().video_values()
        return {"csim": row.get("csim", float("nan")), "csim_real": row.get("csim_real", float("nan"))}


def grayscale(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` -> uint8 luma (ITU-R 601-2, PIL's ``convert("L")``)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).convert("L"))


class CPBD(_FrameMean):
    """CPBD sharpness (Narvekar & Karam 2011, the cpbd package) of every generated and real frame,
    on grayscale."""

    name = "cpbd"

    def update(self, chunk: Chunk) -> None:
        import cpbd

        for which, key in (("pred", "cpbd"), ("gt", "cpbd_real")):
            self.add(key, np.array([cpbd.compute(grayscale(f)) for f in chunk.numpy(which)]))
