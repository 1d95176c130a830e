"""Stage 4, ``hubert``: audio -> 16 kHz -> HuBERT features (50 Hz); and the speech input itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from moditalker.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from moditalker.errors import UserError
from moditalker.fileio import file_sha256
from pipeline.settings import stage_config
from pipeline.stages.context import StageContext, StageResult
from pipeline.validate import Inputs

__all__ = ["Speech", "load_speech", "run", "random_hubert_size"]


@dataclass
class Speech:
    """The input audio at 16 kHz (the part ``--start`` / ``--duration`` select) and its video length."""

    wave: np.ndarray  # float32 [N] at SAMPLE_RATE
    seconds: float
    n_frames: int  # the audio's duration at 25 fps, rounded
    cut: tuple[int, int] | None = None  # the samples [a, b) of the file at SAMPLE_RATE, when cut

    @property
    def hubert_samples(self) -> int:
        return self.n_frames * SAMPLES_PER_FRAME + 80

    def hubert_wave(self) -> np.ndarray:
        """The wave zero-padded so that AToM's T_a // 2 frames cover exactly n_frames (made on demand:
        a copy of a long audio is not kept)."""
        need = self.hubert_samples
        return np.pad(self.wave, (0, max(0, need - len(self.wave))))[:need]

    def at_rate(self, audio: Path, rate: int) -> np.ndarray:
        """The same part of the audio at another sample rate (the mp4's)."""
        from data.audio import load_audio

        if rate == SAMPLE_RATE:
            return self.wave
        full = load_audio(audio, rate)
        if self.cut is None:
            return full
        a, b = (int(round(x * rate / SAMPLE_RATE)) for x in self.cut)
        return np.ascontiguousarray(full[a:b])


def load_speech(cfg: DictConfig, inputs: Inputs) -> Speech:
    """Load the audio (the part ``start`` / ``duration`` select); UserError when it is too short,
    silent or not finite (before any stage runs)."""
    from data.audio import check_waveform, load_audio

    wave = load_audio(inputs.audio, SAMPLE_RATE)
    start, duration = float(cfg.start), cfg.duration
    cut = None
    if start > 0 or duration is not None:
        total = len(wave) / SAMPLE_RATE
        a = int(round(start * SAMPLE_RATE))
        if a >= len(wave):
            raise UserError(f"--start {start:g} s is past the end of {inputs.audio} ({total:.2f} s of audio)")
        b = len(wave) if duration is None else min(len(wave), a + int(round(float(duration) * SAMPLE_RATE)))
        cut = (a, b)
        wave = wave[a:b].copy()  # (the whole file is not kept)
    seconds = len(wave) / SAMPLE_RATE
    if seconds < float(cfg.min_audio_seconds):
        where = f"{inputs.audio}" if cut is None else f"the part of {inputs.audio} from {start:g} s"
        raise UserError(
            f"{where} holds {seconds:.2f} s of audio; at least {cfg.min_audio_seconds} s is needed"
        )
    check_waveform(wave, str(inputs.audio))  # silence / NaN: fail now, not after the reference stages
    n_frames = max(1, int(round(len(wave) / SAMPLES_PER_FRAME)))
    return Speech(wave, seconds, n_frames, cut)


def random_hubert_size(cfg: DictConfig) -> int:
    """Feature size of the random HuBERT: ``hubert.random_hidden_size``, or (null) the AToM
    config's ``model.cond_feature_dim`` so the two always agree (1024 for the official sizes)."""
    if cfg.hubert.random_hidden_size is not None:
        return int(cfg.hubert.random_hidden_size)
    atom_cfg = stage_config(cfg.atom.config)
    if isinstance(atom_cfg, str):
        atom_cfg = OmegaConf.to_container(OmegaConf.load(atom_cfg), resolve=True)
    try:
        return int(atom_cfg["model"]["cond_feature_dim"])
    except (TypeError, KeyError):
        return 1024


def run(ctx: StageContext, speech: Speech) -> StageResult:
    """``hubert``: [2 * n_frames, D] features of the padded waveform."""
    cfg, rw = ctx.cfg, ctx.random_weights
    random_hidden = random_hubert_size(cfg) if rw else 0

    def compute(_) -> dict[str, np.ndarray]:
        from data.audio import HubertExtractor

        if rw:
            ext = ctx.models.load(
                "hubert", HubertExtractor.random, hidden_size=random_hidden, seed=ctx.seed, device=ctx.device
            )
        else:
            ext = ctx.models.load(
                "hubert",
                HubertExtractor,
                ctx.assets["hubert"],
                device=ctx.device,
                batch_size=int(cfg.hubert.batch_size),
            )
        return {"hubert": ext(speech.hubert_wave(), name=str(ctx.inputs.audio))}

    parts = {
        "audio": file_sha256(ctx.inputs.audio),
        "samples": speech.hubert_samples,
        "model": ctx.model_id("hubert", f"random:{random_hidden}:{cfg.seed}"),
    }
    if speech.cut is not None:  # --start / --duration: the samples of the file that were used
        parts["cut"] = list(speech.cut)
    return ctx.run("hubert", parts, compute)
