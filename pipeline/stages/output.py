"""After the stages: the H.264 mp4 (25 fps) with the input audio as AAC, the optional side-by-side
preview (landmarks | generated), the resolved config next to the output, and the timing report."""

from __future__ import annotations

import time

import numpy as np
from omegaconf import DictConfig, OmegaConf

from moditalker.config import save_config
from moditalker.constants import FPS, SAMPLE_RATE
from pipeline.stages.context import StageContext
from pipeline.stages.hubert import Speech

__all__ = ["write", "metadata", "report_timings", "TIMED_STAGES"]

#: the order of the timing report (cached stages and the uncached render / write steps)
TIMED_STAGES = ("reference", "landmarks", "recon", "hubert", "atom", "align", "render", "mtov", "write")


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


def write(ctx: StageContext, speech: Speech, video: np.ndarray, landmark_video: np.ndarray) -> None:
    """The preview and the config first: the main output appears last, only when all is done."""
    from data.audio import load_audio
    from data.video import write_video

    cfg, inputs = ctx.cfg, ctx.inputs
    with ctx.timer()("write"):
        mux_rate = min(max(inputs.audio_rate, 8000), 48000)
        mux_audio = speech.wave if mux_rate == SAMPLE_RATE else load_audio(inputs.audio, mux_rate)
        meta = metadata(cfg)
        hwc = video.transpose(0, 2, 3, 1)
        if inputs.preview is not None:
            side = np.concatenate([landmark_video.transpose(0, 2, 3, 1), hwc], axis=2)
            write_video(inputs.preview, side, fps=FPS, audio=mux_audio, sample_rate=mux_rate, metadata=meta)
        run = {"n_frames": ctx.n_frames, "audio_seconds": round(speech.seconds, 4)}
        save_config(OmegaConf.merge(cfg, {"run": run}), inputs.config_path)
        write_video(
            inputs.out,
            hwc,
            fps=FPS,
            audio=mux_audio,
            sample_rate=mux_rate,
            metadata=meta,
            crf=int(cfg.output.crf),
            preset=str(cfg.output.preset),
        )


def report_timings(ctx: StageContext, t_total: float) -> dict[str, float]:
    """Fill :attr:`StageContext.timings` with the cached stages' seconds and the total (since
    ``t_total``, a ``time.perf_counter`` reading), log the per-stage table and return the timings."""
    timings, records = ctx.timings, ctx.cache.records
    for name, rec in records.items():
        timings[name] = rec.seconds
    timings["total"] = time.perf_counter() - t_total
    video_s = ctx.n_frames / FPS
    ctx.log(f"stage timings ({ctx.n_frames} frames = {video_s:.2f} s of video):")
    for name in TIMED_STAGES:
        if name not in timings:
            continue
        rec = records.get(name)
        how = " (reused)" if rec is not None and rec.cached else ""
        ctx.log(f"  {name:<10} {timings[name]:8.2f} s  {timings[name] / video_s:7.2f} s per s of video{how}")
    ctx.log(f"  {'total':<10} {timings['total']:8.2f} s")
    return timings
