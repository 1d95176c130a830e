"""The benchmark's measuring: one run of the whole chain in one mode, every stage timed, peak memory.

Modes (the call patterns are options of the stage modules; nothing is patched here):

* ``faithful``: the original's call pattern: ``guidance_mode="original"`` for AToM
  (:func:`AToM.inference.generate_landmarks`), :func:`MToV.generate.generate_video_original` for
  MToV, and every network with PyTorch's math attention backend (the original computes attention
  explicitly);
* ``fast``: the defaults of :func:`AToM.inference.generate_landmarks` and
  :func:`MToV.generate.generate_video` (with ``precision``);
* ``fast_fp32``: the same fast path in full precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.prepare import Inputs, Networks
from moditalker.errors import UserError
from moditalker.timing import StageTimer
from MToV.generate import SamplingOptions, generate_video, generate_video_original

__all__ = [
    "FULL_ATOM_STEPS",
    "FULL_MTOV_SCHEDULE",
    "MODES",
    "STAGES",
    "START_RATIO",
    "ModeResult",
    "PeakMemory",
    "run_mode",
]

MODES = ("faithful", "fast", "fast_fp32")
STAGES = ("hubert", "atom", "align", "mtov_encode", "mtov_unet", "mtov_decode", "mtov", "total")
FULL_ATOM_STEPS = 50
FULL_MTOV_SCHEDULE = 100  # DDIM schedule length of MToV; start_ratio 0.25 runs 25 UNet passes of it
START_RATIO = 0.25
#: HuBERT and the alignment, when a call takes under a second, run this many times per mode and the
#: fastest run counts: the noise around a short call only ever adds time
SHORT_REPEATS = 5


class PeakMemory:
    """Peak resident memory (CPU, sampled every 10 ms) or peak allocated memory (CUDA) in a block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self.rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ModeResult:
    seconds: dict[str, float]  # wall clock
    cpu_seconds: dict[str, float]  # process CPU time (all threads) of the top-level stages
    peak_memory_bytes: int
    landmarks: np.ndarray  # AToM output [T, 68, 3]
    frames: np.ndarray  # float32 [T, 3, S, S] in [-1, 1]


def mode_attention(mode: str) -> contextlib.AbstractContextManager:
    """The attention ``mode`` runs every network with: PyTorch's math backend for ``faithful`` (the
    original computes softmax(q k^T) v explicitly), else what each call chooses."""
    return sdpa_kernel(SDPBackend.MATH) if mode == "faithful" else contextlib.nullcontext()


def run_mtov(mode: str, mtov, landmark_video, masked, ident, target, sampling: SamplingOptions, **kw):
    """MToV as ``mode`` runs it: the original's call pattern (``faithful``, which takes ``target``) or
    the fast path (``fast_fp32``: in fp32 whatever ``sampling`` says); ``kw`` to both samplers."""
    if mode == "faithful":
        return generate_video_original(mtov, landmark_video, masked, ident, target, sampling, **kw)
    if mode == "fast_fp32":
        sampling = dataclasses.replace(sampling, precision="fp32")
    return generate_video(mtov, landmark_video, masked, ident, sampling, **kw)


def run_mode(
    mode: str,
    nets: Networks,
    inputs: Inputs,
    *,
    atom_steps: int,
    sampling: SamplingOptions,
    progress: bool = False,
    clock_kind: str = "wall",
) -> ModeResult:
    """Run the whole chain once in ``mode`` (``faithful``, ``fast`` or ``fast_fp32``), timing each stage.
    ``sampling``: MToV's options (``fast_fp32`` runs them in fp32; ``faithful`` uses its seed, start
    ratio and schedule); its seed is AToM's too."""
    from AToM.inference import generate_landmarks
    from data.imageops import mask_below_nose
    from data.motion_align import align_landmarks, render_landmarks

    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; use one of {MODES}")
    dev = nets.mtov.device
    size = nets.mtov.resolution
    sec: dict[str, float] = {}
    mt: dict[str, float] = {}
    # MToV's per-stage seconds on the same clock as the top-level stages
    timer = StageTimer(mt, dev, clock=time.process_time if clock_kind == "cpu" else None)
    mtov_kw = dict(timer=timer, return_float=True, progress=progress)
    cpu: dict[str, float] = {}

    now = time.process_time if clock_kind == "cpu" else time.perf_counter

    def clock() -> float:
        _sync(dev)
        return now()

    def cpu_mark(name: str, since: float) -> float:
        now = time.process_time()
        cpu[name] = now - since
        return now

    # The original computes attention explicitly (softmax(q k^T) v, no fused kernels): the faithful
    # mode runs every network with PyTorch's math attention backend; the fast modes use SDPA's fused
    # (flash) kernels, except HuBERT and AToM on the CPU, which take the math backend there too
    # (moditalker.device.original_attention: the same landmarks bit for bit, 4 % of AToM's time).
    attention = mode_attention(mode)

    def short(name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, run SHORT_REPEATS times when it takes under a second; the wall and CPU seconds of its
        fastest run are the stage's (a short stage is otherwise timed mostly by the noise around it)."""
        runs: list[tuple[float, float]] = []
        while not runs or (len(runs) < SHORT_REPEATS and runs[0][0] < 1.0):
            c, t = time.process_time(), clock()
            out = fn()
            runs.append((clock() - t, time.process_time() - c))
        sec[name], cpu[name] = min(runs)
        return out

    def align() -> tuple:
        aligned = align_landmarks(lm3d, inputs.lm68, inputs.coeff, inputs.lm3d_std, hw)
        posed_ref = align_landmarks(inputs.ref_lm3d, inputs.lm68, inputs.coeff, inputs.lm3d_std, hw)
        landmark_video = render_landmarks(aligned, hw, size=size)
        masked = np.ascontiguousarray(mask_below_nose(inputs.frames, posed_ref).transpose(0, 3, 1, 2))
        return landmark_video, masked

    hw = inputs.frames.shape[1:3]
    with PeakMemory(dev) as mem, attention:
        hub = short("hubert", lambda: nets.hubert(inputs.wave, name="benchmark speech"))
        c1, t1 = time.process_time(), clock()
        lm3d = generate_landmarks(
            nets.atom,
            hub,
            inputs.ref_lm3d[0],
            inputs.key_mean,
            steps=atom_steps,
            seed=sampling.seed,
            progress=progress,
            guidance_mode="original" if mode == "faithful" else "auto",
        )[: inputs.n_frames]
        sec["atom"] = clock() - t1
        cpu_mark("atom", c1)
        landmark_video, masked = short("align", align)
        ident = np.ascontiguousarray(inputs.frames[0].transpose(2, 0, 1))
        c3, t3 = time.process_time(), clock()
        target = np.ascontiguousarray(inputs.frames.transpose(0, 3, 1, 2)) if mode == "faithful" else None
        frames = run_mtov(mode, nets.mtov, landmark_video, masked, ident, target, sampling, **mtov_kw)
        sec["mtov"] = clock() - t3
        cpu_mark("mtov", c3)
    for k in ("encode", "unet", "decode"):
        sec[f"mtov_{k}"] = mt.get(k, 0.0)
    top = ("hubert", "atom", "align", "mtov")
    sec["total"], cpu["total"] = sum(sec[k] for k in top), sum(cpu[k] for k in top)
    return ModeResult(sec, cpu, mem.peak_bytes, np.asarray(lm3d), np.asarray(frames, np.float32))
