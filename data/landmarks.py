"""68-point 2D face landmarks with face_alignment's 2D-FAN-4 and its s3fd face detector, batched.

As the original preprocessing: ``LandmarksType.TWO_D``, network size 4, no flip augmentation,
the most confident face of each frame. Unlike ``face_alignment.FaceAlignment`` this class never
downloads anything unless asked to (``allow_download=True``): the two weight files are read from
``weights_dir`` (default ``checkpoints/face_alignment/``) or from face_alignment's own torch-hub
cache. Detection runs on whole batches of frames, and FAN on the batch of face crops.

Frames without a face: short gaps (at most ``max_gap`` consecutive frames) are filled by linear
interpolation from the neighbouring frames (or copied from the nearest frame at the clip ends) and
counted; longer gaps and videos without any face raise :class:`UserError`.

Tests and dataset builders can inject ``detector``: any callable taking a uint8 batch
``[B, H, W, 3]`` and returning, per frame, a ``[68, 2]`` landmark array or ``None`` (no face);
a ``[B, 68, 2]`` array with NaN rows for missing faces works too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moditalker.assets import default_path, missing_message
from moditalker.checkpoint import load_strict, read_checkpoint, unwrap_state_dict
from moditalker.device import resolve_device
from moditalker.errors import UserError

__all__ = [
    "FaceLandmarkDetector",
    "fill_missing",
    "heatmaps_to_points",
    "template_face_detector",
    "FAN_FILE",
    "S3FD_FILE",
]

FAN_FILE = "2DFAN4-11f355bf06.pth.tar"
S3FD_FILE = "s3fd-619a316812.pth"
_URLS = {
    FAN_FILE: "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
    S3FD_FILE: "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",
}

Detector = Callable[[np.ndarray], "Sequence[np.ndarray | None] | np.ndarray"]


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def template_face_detector(frames: np.ndarray) -> np.ndarray:
    """Stand-in detector for ``--random_weights`` smoke runs: a fixed frontal face in every frame.

    Random FAN/s3fd weights find no face, so runs without weights inject this instead: the
    synthetic :func:`data.face3d.canonical_face_lm68` layout, 0.3 frame widths per BFM unit, centred
    horizontally with the face centre at 45% of the height. Returns ``[B, 68, 2]`` float32.
    """
    from data.face3d import canonical_face_lm68

    frames = np.asarray(frames)
    height, width = frames.shape[1:3]
    face = canonical_face_lm68()[:, :2]
    lm = np.stack([width / 2 + face[:, 0] * 0.3 * width, 0.45 * height - face[:, 1] * 0.3 * height], axis=1)
    return np.repeat(lm[None].astype(np.float32), len(frames), axis=0)


def heatmaps_to_points(heat: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """FAN heatmaps ``[B, 68, R, R]`` -> frame pixels ``[B, 68, 2]``, as face_alignment decodes them.

    Arg-max of each heatmap, a quarter-pixel step towards the larger neighbour (interior peaks
    only), minus 0.5, mapped back through the crop (``x * 200 s / R + c - 100 s``) and truncated to
    whole pixels like face_alignment's ``transform_np``. Vectorised, so no numba compilation.
    """
    heat = np.asarray(heat, dtype=np.float32)
    b, k, h, w = heat.shape
    flat = heat.reshape(b, k, h * w)
    idx = flat.argmax(-1)
    px, py = idx % w, idx // w
    pts = np.stack([px + 1, py + 1], axis=-1).astype(np.float32)
    inner = (px > 0) & (px < w - 1) & (py > 0) & (py < h - 1)
    bi, ki = np.nonzero(inner)
    x, y = px[bi, ki], py[bi, ki]
    dx = heat[bi, ki, y, x + 1] - heat[bi, ki, y, x - 1]
    dy = heat[bi, ki, y + 1, x] - heat[bi, ki, y - 1, x]
    pts[bi, ki] += np.sign(np.stack([dx, dy], axis=-1)) * np.float32(0.25)
    pts -= np.float32(0.5)
    size = 200.0 * np.asarray(scales, dtype=np.float64).reshape(b, 1, 1)
    centers = np.asarray(centers, dtype=np.float64).reshape(b, 1, 2)
    img = pts.astype(np.float64) * size / h + centers - size / 2
    return np.trunc(img).astype(np.float32)


def fill_missing(lms: np.ndarray, max_gap: int = 5, source: str = "video") -> tuple[np.ndarray, int]:
    """Fill NaN frames of ``lms [T, 68, 2]`` from their neighbours; returns ``(filled, n_filled)``.

    Interior gaps are linearly interpolated between the frames around them, gaps at the start or
    end copy the nearest detected frame. Gaps longer than ``max_gap`` frames raise UserError.
    """
    lms = np.array(lms, dtype=np.float32)
    found = np.isfinite(lms).all(axis=(1, 2))
    if not found.any():
        raise UserError(
            f"no face found in any of the {len(lms)} frames of {source}; use a video showing one face"
        )
    missing = np.flatnonzero(~found)
    if missing.size == 0:
        return lms, 0
    # runs of consecutive missing frames
    runs = np.split(missing, np.flatnonzero(np.diff(missing) > 1) + 1)
    for run in runs:
        if len(run) > max_gap:
            raise UserError(
                f"no face in frames {run[0]}..{run[-1]} of {source} ({len(run)} consecutive frames, more "
                f"than max_gap={max_gap}); trim the video or raise max_gap"
            )
    idx = np.flatnonzero(found)
    flat = lms.reshape(len(lms), -1)
    for k in range(flat.shape[1]):  # np.interp copies the end values for frames outside [idx0, idx-1]
        flat[missing, k] = np.interp(missing, idx, flat[idx, k])
    return flat.reshape(lms.shape), int(missing.size)


class FaceLandmarkDetector:
    """2D FAN landmarks for video frames: ``detect(frames) -> (lm68 float32 [T, 68, 2], n_interpolated)``.

    ``device`` is ``auto|cpu|cuda|cuda:N``; ``weights_dir`` holds ``2DFAN4-11f355bf06.pth.tar`` and
    ``s3fd-619a316812.pth``; ``detector`` replaces the networks entirely (see module docstring).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        weights_dir: str | Path | None = None,
        detector: Detector | None = None,
        *,
        batch_size: int = 8,
        max_gap: int = 5,
        allow_download: bool = False,
        face_threshold: float = 0.5,
    ) -> None:
        self.device = resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        self.max_gap = int(max_gap)
        self.detector = detector
        self.face_threshold = face_threshold
        if detector is None:
            fan_path, s3fd_path = self._weight_paths(weights_dir, allow_download)
            self._build(fan_path, s3fd_path)

    # ------------------------------------------------------------------ weights
    @staticmethod
    def _weight_paths(weights_dir: str | Path | None, allow_download: bool) -> tuple[Path, Path]:
        folders = [Path(weights_dir)] if weights_dir is not None else [default_path("face_alignment")]
        if weights_dir is None:
            folders.append(_hub_checkpoints())
        for folder in folders:
            if (folder / FAN_FILE).is_file() and (folder / S3FD_FILE).is_file():
                return folder / FAN_FILE, folder / S3FD_FILE
        if not allow_download:
            raise UserError(
                "face-alignment weights not found (allow_download=True / --allow_download lets the package "
                "fetch them into torch-hub's cache); " + missing_message("face_alignment", folders[0])
            )
        from face_alignment.utils import load_file_from_url

        return tuple(Path(load_file_from_url(_URLS[name])) for name in (FAN_FILE, S3FD_FILE))  # type: ignore

    def _build(self, fan_path: Path, s3fd_path: Path) -> None:
        from face_alignment.detection.sfd.net_s3fd import s3fd
        from face_alignment.models import FAN

        self.fan = FAN(4)
        self.s3fd = s3fd()
        for net, path, what in (
            (self.fan, fan_path, "FAN landmark"),
            (self.s3fd, s3fd_path, "s3fd face detector"),
        ):
            state = unwrap_state_dict(read_checkpoint(path, what), path)
            load_strict(
                net,
                state,
                path,
                f"{what} checkpoint",
                fix="re-download it (python -m moditalker.assets download)",
            )
        self.fan.eval().to(self.device)
        self.s3fd.eval().to(self.device)

    # ------------------------------------------------------------------ detection
    @torch.inference_mode()
    def _detect_boxes(self, frames: np.ndarray) -> list[np.ndarray | None]:
        """The most confident s3fd face box ``[x1, y1, x2, y2, score]`` per frame (None: no face)."""
        from face_alignment.detection.sfd.bbox import nms
        from face_alignment.detection.sfd.detect import batch_detect

        batch = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        # face_alignment's batch_detect turns on torch.backends.cudnn.benchmark for the whole process on
        # CUDA: every later convolution (MToV, HuBERT) would then pick its algorithm by timing, so its
        # numbers could differ from run to run. Put the setting back.
        benchmark = torch.backends.cudnn.benchmark
        try:
            boxlists = batch_detect(self.s3fd, batch, device=str(self.device))
        finally:
            torch.backends.cudnn.benchmark = benchmark
        boxes: list[np.ndarray | None] = []
        for i in range(len(frames)):
            cand = np.asarray(boxlists[i]) if len(boxlists) else np.zeros((0, 5))
            if len(cand):
                cand = cand[nms(cand, 0.3)]
                cand = cand[cand[:, 4] > self.face_threshold]
            boxes.append(cand[np.argmax(cand[:, 4])] if len(cand) else None)
        return boxes

    @torch.inference_mode()
    def _fan(self, frames: np.ndarray, boxes: list[np.ndarray | None]) -> np.ndarray:
        """FAN on the face crops of one batch -> [B, 68, 2] (NaN where there is no box)."""
        from face_alignment.detection.core import REFERENCE_SCALE
        from face_alignment.utils import CENTER_Y_OFFSET, crop

        out = np.full((len(frames), 68, 2), np.nan, dtype=np.float32)
        crops, params, where = [], [], []
        for i, box in enumerate(boxes):
            if box is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in box[:4])
            center = np.array([x2 - (x2 - x1) / 2.0, y2 - (y2 - y1) / 2.0])
            center[1] -= (y2 - y1) * CENTER_Y_OFFSET
            scale = (x2 - x1 + y2 - y1) / REFERENCE_SCALE
            crops.append(crop(frames[i], center, scale).transpose(2, 0, 1).astype(np.float32) / 255.0)
            params.append((center, scale))
            where.append(i)
        if not crops:
            return out
        heat = self.fan(torch.from_numpy(np.stack(crops)).to(self.device))
        if isinstance(heat, list):
            heat = heat[-1]
        centers = np.stack([c for c, _ in params])
        scales = np.array([s for _, s in params])
        out[where] = heatmaps_to_points(heat.float().cpu().numpy(), centers, scales)
        return out

    def _run_injected(self, frames: np.ndarray) -> np.ndarray:
        result = self.detector(frames)  # type: ignore[misc]
        out = np.full((len(frames), 68, 2), np.nan, dtype=np.float32)
        if isinstance(result, np.ndarray) and result.shape == out.shape:
            return result.astype(np.float32)
        if len(result) != len(frames):
            raise UserError(f"the landmark detector returned {len(result)} results for {len(frames)} frames")
        for i, lm in enumerate(result):
            if lm is not None and len(lm):
                out[i] = np.asarray(lm, dtype=np.float32).reshape(-1, 68, 2)[0]
        return out

    def detect_raw(self, frames: np.ndarray, progress: bool = False) -> np.ndarray:
        """Landmarks ``[T, 68, 2]`` (x, y down, pixels) with NaN rows where no face was found."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise UserError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        out = np.empty((len(frames), 68, 2), dtype=np.float32)
        steps = range(0, len(frames), self.batch_size)
        for i in tqdm(steps, desc="landmarks", disable=not progress, leave=False):
            batch = frames[i : i + self.batch_size]
            if self.detector is not None:
                out[i : i + len(batch)] = self._run_injected(batch)
            else:
                out[i : i + len(batch)] = self._fan(batch, self._detect_boxes(batch))
        return out

    def detect(
        self, frames: np.ndarray, progress: bool = False, source: str = "video"
    ) -> tuple[np.ndarray, int]:
        """Landmarks float32 ``[T, 68, 2]`` for every frame and how many frames were interpolated."""
        return fill_missing(self.detect_raw(frames, progress), self.max_gap, source)
