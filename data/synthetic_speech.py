"""The speech of the synthetic talking-face world (:mod:`data.synthetic`): speech-like sentences
synthesised here, their loudness per video frame, and the true mouth opening that follows it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moditalker.constants import SAMPLE_RATE, SAMPLES_PER_FRAME

LAG_FRAMES = 2  #: the mouth follows the loudness envelope this many video frames (80 ms) later
OPEN_DB = (-30.0, -6.0)  #: loudness (dB below the sentence's loudest frame) of a closed / fully open mouth
SMOOTH_FRAMES = 5  #: width of the Hann window smoothing the loudness envelope


_VOWELS = (  # (F1, F2, F3) Hz
    (730, 1090, 2440),
    (270, 2290, 3010),
    (530, 1840, 2480),
    (660, 1720, 2410),
    (300, 870, 2240),
    (570, 840, 2410),
    (440, 1020, 2240),
    (490, 1350, 1690),
)


def _syllable(rng: np.random.Generator, f0: float, seconds: float, stress: float) -> np.ndarray:
    """One voiced syllable; its loudness follows the vowel's openness (its F1: open vowels are
    louder, as in real speech) times ``stress``."""
    n = max(1, int(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    # pitch: a slow glide and a little vibrato around f0
    glide = rng.uniform(-0.15, 0.15)
    f0_t = f0 * (1.0 + glide * t / max(seconds, 1e-3) + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0_t) / SAMPLE_RATE
    formants = np.asarray(_VOWELS[rng.integers(len(_VOWELS))], np.float64) * rng.uniform(0.95, 1.05)
    openness = np.clip((formants[0] - 250.0) / (760.0 - 250.0), 0.0, 1.0)
    peak = stress * 10 ** (-(1.0 - openness) * 14.0 / 20)  # a closed vowel is 14 dB below an open one
    k = np.arange(1, int(5000 // f0) + 1)
    freq = k * f0
    gain = sum(
        np.exp(-0.5 * ((freq - fr) / (60 + 0.05 * fr)) ** 2) * g for fr, g in zip(formants, (1.0, 0.6, 0.25))
    )
    attack, release = rng.uniform(0.02, 0.05), rng.uniform(0.04, 0.09)
    env = np.clip(np.minimum(t / attack, (seconds - t) / release), 0.0, 1.0)
    env = 0.5 - 0.5 * np.cos(np.pi * env)
    # vocal effort: a louder voice has a flatter spectrum (spectral tilt from k^-1.6 when quiet to
    # k^-0.4 at full effort), so loudness shows in the spectrum's shape, not only in its scale
    effort = env * peak
    amps = (gain + 0.02)[:, None] * np.exp(-(1.6 - 1.2 * effort)[None] * np.log(k)[:, None])  # [K, n]
    voiced = (amps * np.sin(k[:, None] * phase[None] + rng.uniform(0, 2 * np.pi, len(k))[:, None])).sum(0)
    voiced /= np.sqrt((amps**2).sum(0) / 2) + 1e-12  # unit RMS: the loudness is env * peak exactly
    wave = 0.5 * voiced * effort
    if rng.random() < 0.5:  # a consonant: a short burst of high-passed noise before the vowel
        m = int(rng.uniform(0.02, 0.06) * SAMPLE_RATE)
        burst = np.diff(rng.normal(size=m + 1)) * rng.uniform(0.1, 0.3) * peak
        burst *= np.hanning(m)
        wave = np.concatenate([burst, wave])
    return wave


def synth_sentence(seed: int | Sequence[int], seconds: tuple[float, float] = (3.0, 5.0)) -> np.ndarray:
    """A speech-like float32 16 kHz waveform from its own random generator (``seed``): silence,
    2-4 phrases of 2-5 words of 1-3 syllables with pauses between phrases and often between words,
    a pitch per "speaker" with declination, syllables of varying stress; peak 0.9."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(*seconds)
    f0_base = rng.uniform(95, 230)
    parts = [np.zeros(int(rng.uniform(0.15, 0.4) * SAMPLE_RATE))]
    length = len(parts[0])
    while length < (target - 0.3) * SAMPLE_RATE:
        for _ in range(rng.integers(2, 6)):  # words of a phrase
            for _ in range(rng.integers(1, 4)):  # syllables of a word
                decl = 1.0 - 0.15 * min(1.0, length / (target * SAMPLE_RATE))
                f0 = f0_base * decl * rng.uniform(0.9, 1.15)
                parts.append(_syllable(rng, f0, rng.uniform(0.1, 0.28), rng.uniform(0.7, 1.0)))
                parts.append(np.zeros(int(rng.uniform(0.0, 0.03) * SAMPLE_RATE)))
                length += len(parts[-1]) + len(parts[-2])
            if rng.random() < 0.6:
                parts.append(np.zeros(int(rng.uniform(0.03, 0.12) * SAMPLE_RATE)))
                length += len(parts[-1])
        parts.append(np.zeros(int(rng.uniform(0.25, 0.5) * SAMPLE_RATE)))
        length += len(parts[-1])
    wave = np.concatenate(parts)
    n = int(round(target * SAMPLE_RATE))
    wave = np.pad(wave, (0, max(0, n - len(wave))))[:n]
    wave = wave / (np.abs(wave).max() + 1e-9) * 0.9
    wave = wave + rng.normal(0.0, 1e-4, len(wave))  # a faint noise floor (-80 dB)
    return wave.astype(np.float32)


def loudness_db(wave: np.ndarray, n_frames: int | None = None) -> np.ndarray:
    """RMS loudness of each 40 ms video frame (samples ``640 t .. 640 t + 639``) in dB, ``[T]``."""
    wave = np.asarray(wave, np.float64)
    n = len(wave) // SAMPLES_PER_FRAME if n_frames is None else int(n_frames)
    frames = np.pad(wave, (0, max(0, n * SAMPLES_PER_FRAME - len(wave))))[: n * SAMPLES_PER_FRAME]
    rms = np.sqrt((frames.reshape(n, SAMPLES_PER_FRAME) ** 2).mean(1))
    return 20 * np.log10(rms + 1e-6)


def mouth_opening(wave: np.ndarray, n_frames: int | None = None) -> np.ndarray:
    """The true mouth opening in [0, 1] per video frame: the loudness envelope (dB below the loudest
    frame, -30 dB -> 0, -6 dB -> 1), smoothed (Hann, :data:`SMOOTH_FRAMES`), :data:`LAG_FRAMES` late."""
    db = loudness_db(wave, n_frames)
    lo, hi = OPEN_DB
    raw = np.clip((db - db.max() - lo) / (hi - lo), 0.0, 1.0)
    win = np.hanning(SMOOTH_FRAMES + 2)[1:-1]
    smooth = np.convolve(np.pad(raw, SMOOTH_FRAMES // 2, mode="edge"), win / win.sum(), mode="valid")
    return np.concatenate([np.full(LAG_FRAMES, smooth[0]), smooth[: len(smooth) - LAG_FRAMES]])
