"""What a run reports while it works, to whoever subscribes: a stage *started*, *finished* (reused from
the work cache or computed, in how many seconds) and its *progress* (done of total). :data:`STAGES`
is the one list of the steps and their order.

:func:`pipeline.inference.run_inference` sends the events of every stage to its subscribers
(``events=``); the run log (:class:`StageLog`), the timing table (:class:`StageTimes`), the web page's
progress bar and the batch summary are such subscribers. A subscriber is a :class:`StageEvents` that
overrides what it needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "STAGES",
    "PARTS",
    "TIMING_ORDER",
    "DESCRIBE",
    "StageEvents",
    "Subscribers",
    "StageLog",
    "StageTimes",
]

#: the steps of a run, in order: the cached stages, then the mp4 writer's last part (closing the
#: encoders, the preview and the config, renaming the video into place)
STAGES = ("reference", "landmarks", "recon", "hubert", "atom", "align", "mtov", "write")
#: uncached steps timed inside a stage, reported finished just before it (not a stage of their own)
PARTS = {"mtov": ("render",)}
#: the order of the timing table: each stage after its parts
TIMING_ORDER = tuple(name for stage in STAGES for name in (*PARTS.get(stage, ()), stage))
#: what each step does, in words
DESCRIBE = {
    "reference": "reading the reference",
    "landmarks": "face landmarks",
    "recon": "3D face reconstruction",
    "hubert": "speech features",
    "atom": "AToM: motion",
    "align": "aligning the motion",
    "mtov": "MToV: video frames",
    "write": "writing the mp4",
}
assert set(DESCRIBE) == set(STAGES)


class StageEvents:
    """A subscriber: every method does nothing; override those you need."""

    def started(self, stage: str) -> None:
        """``stage`` begins (it may still turn out to be reused)."""

    def finished(self, stage: str, *, cached: bool, seconds: float, entry: Path | None = None) -> None:
        """``stage`` is done: ``cached`` when its result was reused, ``entry`` its work-cache folder."""

    def progress(self, stage: str, done: int, total: int) -> None:
        """``done`` of ``total`` units of ``stage`` (MToV: frames) are done."""


class Subscribers(StageEvents):
    """Sends every event to each subscriber, in order."""

    def __init__(self, *subscribers: StageEvents | None) -> None:
        self.subscribers = [s for s in subscribers if s is not None]

    def started(self, stage: str) -> None:
        for s in self.subscribers:
            s.started(stage)

    def finished(self, stage: str, *, cached: bool, seconds: float, entry: Path | None = None) -> None:
        for s in self.subscribers:
            s.finished(stage, cached=cached, seconds=seconds, entry=entry)

    def progress(self, stage: str, done: int, total: int) -> None:
        for s in self.subscribers:
            s.progress(stage, done, total)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class StageLog(StageEvents):
    """The run log's stage lines: ``[atom] computed in 1.23 s -> WORK/atom-KEY``, ``[atom] reused
    atom-KEY (0.01 s)`` for a work-cache stage, and, while a stage reports progress, every ``every``
    seconds ``[mtov] 120/500 frames (24 %), 0:01:00 so far, ~0:03:10 left`` (the rate of the units
    done in this run: a resumed stage's earlier units do not count)."""

    def __init__(
        self,
        log: Callable[[str], None],
        every: float = 30.0,
        clock: Callable[[], float] = time.perf_counter,
        unit: str = "frames",
    ) -> None:
        self.log, self.every, self.clock, self.unit = log, float(every), clock, unit
        self._first: dict[str, tuple[int, float]] = {}  # stage -> (done, time) of its first progress
        self._last: dict[str, float] = {}

    def finished(self, stage: str, *, cached: bool, seconds: float, entry: Path | None = None) -> None:
        if entry is None:
            return
        if cached:
            self.log(f"[{stage}] reused {entry.name} ({seconds:.2f} s)")
        else:
            self.log(f"[{stage}] computed in {seconds:.2f} s -> {entry}")

    def progress(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage not in self._first:
            self._first[stage], self._last[stage] = (done, now), now
            return
        first, t0 = self._first[stage]
        if now - self._last[stage] < self.every or done >= total or done <= first:
            return
        self._last[stage] = now
        left = (now - t0) / (done - first) * (total - done)
        text = f"{done}/{total} {self.unit} ({100 * done / total:.0f} %), {_clock(now - t0)} so far"
        self.log(f"[{stage}] {text}, ~{_clock(left)} left")


class StageTimes(StageEvents):
    """The timing table: the seconds of every step that finished, and whether it was reused."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    def finished(self, stage: str, *, cached: bool, seconds: float, entry: Path | None = None) -> None:
        self.seconds[stage] = float(seconds)
        self.cached[stage] = bool(cached)

    def table(
        self, n_frames: int, fps: float, total: float, notes: dict[str, str] | None = None
    ) -> list[str]:
        """The lines of the table in :data:`TIMING_ORDER`: seconds, seconds per second of video (of
        ``n_frames`` at ``fps``), ``(reused)`` and the step's note, then the total."""
        notes, video_seconds = notes or {}, n_frames / fps
        lines = [f"stage timings ({n_frames} frames = {video_seconds:.2f} s of video):"]
        for name in TIMING_ORDER:
            if name not in self.seconds:
                continue
            s = self.seconds[name]
            line = f"  {name:<10} {s:8.2f} s  {s / video_seconds:7.2f} s per s of video"
            line += " (reused)" if self.cached[name] else ""
            lines.append(line + (f"  {notes[name]}" if name in notes else ""))
        return [*lines, f"  {'total':<10} {total:8.2f} s"]
