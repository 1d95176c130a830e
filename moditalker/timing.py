"""Seconds per named stage: the one timer of the pipeline, the MToV generator and the benchmarks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch


class StageTimer:
    """``with timer("encode"): ...`` adds the block's seconds to ``timings["encode"]``.

    ``clock`` is wall time by default (``time.process_time`` counts CPU seconds of all threads, which
    is steadier on a busy machine); on CUDA the device is synchronised at both ends so queued kernels
    are counted where they run. ``log`` (optional) is called with ``"[name] 1.23 s"`` after each
    block that finished without an error. With ``timings=None`` every block is a no-op.
    """

    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(
        self,
        timings: dict[str, float] | None,
        device: torch.device | None = None,
        clock: Callable[[], float] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.timings, self.device, self.log = timings, device, log
        if clock is not None:
            self.clock = clock

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        if self.timings is None:
            return contextlib.nullcontext()
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = self.clock()
        yield
        self._sync()
        seconds = self.clock() - t0
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        if self.log is not None:
            self.log(f"[{name}] {seconds:.2f} s")
