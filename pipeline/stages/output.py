"""Stage 8, the output: the H.264 mp4 (25 fps) with the input audio as AAC and the optional side-by-side
preview (landmarks | generated), written while MToV runs (:class:`VideoSink`: frames go to the
encoders batch by batch), the resolved config next to the output, and the timing report."""

from __future__ import annotations

import time

import numpy as np
from omegaconf import DictConfig, OmegaConf

from moditalker.config import save_config
from moditalker.constants import FPS
from moditalker.timing import StageTimer
from pipeline.stages.context import StageContext
from pipeline.stages.hubert import Speech

__all__ = ["VideoSink", "open_video", "metadata", "report_timings"]


def metadata(cfg: DictConfig) -> dict[str, str]:
    """Container metadata of the mp4s: what made them, and a loud note for random weights."""
    note = "MoDiTalker reimplementation (AToM + MToV)"
    if cfg.random_weights:
        note += "; RANDOM WEIGHTS (--random_weights): not a real result, pipeline test only"
    return {
        "comment": note,
        "description": f"random_weights={bool(cfg.random_weights)}; seed={cfg.seed}; "
        f"atom.steps={cfg.atom.steps}; atom.guidance_weight={cfg.atom.guidance_weight}; "
        f"mtov.start_ratio={cfg.mtov.start_ratio}; mtov.sampling_timesteps={cfg.mtov.sampling_timesteps}",
    }


class VideoSink:
    """The mp4 and the preview, open while MToV runs: :meth:`add` encodes a batch of frames (nothing of
    the video's length is held), :meth:`finish` writes the preview, the config and, last, the mp4.

    The files are written under temp names in the work folder and renamed to their paths only when
    complete (:class:`data.video.VideoWriter`); on an error (or a kill) nothing appears at the output
    paths, and the next run removes what a killed one left. Used as a context manager: finished on
    success, aborted on an exception.
    """

    def __init__(self, ctx: StageContext, speech: Speech) -> None:
        from data.video import VideoWriter

        cfg, inputs = ctx.cfg, ctx.inputs
        self.ctx, self.speech, self.frames = ctx, speech, 0
        self.timer = StageTimer(ctx.timings)
        for path in (inputs.out, inputs.preview):  # temp files of a killed run of this output
            for stale in inputs.work_dir.glob(f".{path.name}.*") if path is not None else ():
                stale.unlink(missing_ok=True)
        with self.timer("write"):
            mux_rate = min(max(inputs.audio_rate, 8000), 48000)
            kw = dict(
                audio=speech.at_rate(inputs.audio, mux_rate),
                sample_rate=mux_rate,
                n_frames=ctx.n_frames,
                metadata=metadata(cfg),
                tmp_dir=inputs.work_dir,
            )
            s = ctx.size
            self.preview = VideoWriter(inputs.preview, 2 * s, s, FPS, **kw) if inputs.preview else None
            try:
                self.main = VideoWriter(
                    inputs.out, s, s, FPS, crf=int(cfg.output.crf), preset=str(cfg.output.preset), **kw
                )
            except BaseException:
                if self.preview is not None:
                    self.preview.abort()
                raise

    @property
    def wants_landmarks(self) -> bool:
        """Whether :meth:`add` needs the landmark frames (for the preview)."""
        return self.preview is not None

    def add(self, frames: np.ndarray, landmarks: np.ndarray | None = None) -> None:
        """Encode the next uint8 ``[n, 3, S, S]`` frames (and their landmark frames, for the preview)."""
        with self.timer("write"):
            hwc = frames.transpose(0, 2, 3, 1)
            if self.preview is not None:
                self.preview.write(np.concatenate([landmarks.transpose(0, 2, 3, 1), hwc], axis=2))
            self.main.write(hwc)
            self.frames += len(frames)

    def finish(self) -> None:
        """The preview and the config first: the main output appears last, only when all is done."""
        ctx = self.ctx
        if self.frames != ctx.n_frames:
            raise RuntimeError(f"MToV gave {self.frames} frames for {ctx.n_frames} landmark frames")
        ctx.events.started("write")
        with self.timer("write"):
            if self.preview is not None:
                self.preview.close()
            run = {"n_frames": ctx.n_frames, "audio_seconds": round(self.speech.seconds, 4)}
            save_config(OmegaConf.merge(ctx.cfg, {"run": run}), ctx.inputs.config_path)
            self.main.close()
        ctx.events.finished("write", cached=False, seconds=ctx.timings["write"])

    def abort(self) -> None:
        for writer in (self.preview, self.main):
            if writer is not None:
                writer.abort()

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def open_video(ctx: StageContext, speech: Speech) -> VideoSink:
    """The writers of the mp4 and the preview (see :class:`VideoSink`)."""
    return VideoSink(ctx, speech)


def report_timings(ctx: StageContext, t_total: float) -> dict[str, float]:
    """Log the timing table (:class:`pipeline.events.StageTimes`, the steps' finished events) and
    return its seconds per step and the total (since ``t_total``, a ``time.perf_counter`` reading)."""
    timings = {**ctx.times.seconds, "total": time.perf_counter() - t_total}
    for line in ctx.times.table(ctx.n_frames, FPS, timings["total"], ctx.notes):
        ctx.log(line)
    return timings
