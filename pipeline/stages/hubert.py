"""Stage 4, ``hubert``: audio -> 16 kHz -> HuBERT features (50 Hz); and the speech input itself."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig, OmegaConf

from moditalker.constants import SAMPLE_RATE, SAMPLES_PER_FRAME
from moditalker.errors import UserError
from pipeline.cache import file_digest
from pipeline.settings import stage_config
from pipeline.stages.context import StageContext, StageResult
from pipeline.validate import Inputs

__all__ = ["Speech", "load_speech", "run", "random_hubert_size"]


@dataclass
class Speech:
    """The input audio at 16 kHz and the video length it gives."""

    wave: np.ndarray  # float32 [N] at SAMPLE_RATE
    seconds: float
    n_frames: int  # the audio's duration at 25 fps, rounded
    hubert_wave: np.ndarray  # zero-padded so that AToM's T_a // 2 frames cover exactly n_frames


def load_speech(cfg: DictConfig, inputs: Inputs) -> Speech:
    """Load the audio; UserError when it is too short, silent or not finite (before any stage runs)."""
    from data.audio import check_waveform, load_audio

    wave = load_audio(inputs.audio, SAMPLE_RATE)
    seconds = len(wave) / SAMPLE_RATE
    if seconds < float(cfg.min_audio_seconds):
        raise UserError(
            f"{inputs.audio} holds {seconds:.2f} s of audio; at least {cfg.min_audio_seconds} s is needed"
        )
    check_waveform(wave, str(inputs.audio))  # silence / NaN: fail now, not after the reference stages
    n_frames = max(1, int(round(len(wave) / SAMPLES_PER_FRAME)))
    need = n_frames * SAMPLES_PER_FRAME + 80
    hubert_wave = np.pad(wave, (0, max(0, need - len(wave))))[:need]
    return Speech(wave, seconds, n_frames, hubert_wave)


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
        return {"hubert": ext(speech.hubert_wave, name=str(ctx.inputs.audio))}

    parts = {
        "audio": file_digest(ctx.inputs.audio),
        "samples": len(speech.hubert_wave),
        "model": ctx.model_id("hubert", f"random:{random_hidden}:{cfg.seed}"),
    }
    return ctx.run("hubert", parts, compute)
