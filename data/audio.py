"""Audio loading (any file or a video's audio track -> 16 kHz mono) and HuBERT features at 50 Hz.

AToM is conditioned on ``last_hidden_state`` of HuBERT-large (``facebook/hubert-large-ls960-ft``):
1024-d features at 50 Hz from 16 kHz audio, i.e. two feature frames per 25 fps video frame. The
HuBERT convolutional front end acts like one big Conv1d with kernel 400 and stride 320, so a
waveform of ``N`` samples gives ``T = (N - 80) // 320`` frames. Long audio is cut into 20 s
chunks that overlap by ``400 - 320 = 80`` samples, so the chunk outputs join without a gap or a
duplicate and the total length is exactly ``T`` (the original GeneFace/MoDiTalker procedure; the
waveform is normalised once as a whole by the model's feature extractor before chunking).

CLI (also ``scripts/process_audio.sh``)::

    python -m data.audio --audio speech.wav clip.mp4 --out_dir outputs/hubert --device auto
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly
from tqdm import tqdm

from data.video import media_problem
from moditalker.assets import warn_random_weights
from moditalker.constants import SAMPLE_RATE
from moditalker.device import original_attention, resolve_device
from moditalker.errors import UserError, cli_main, script_prog
from moditalker.fileio import atomic_path, check_output, require_file, save_npy

__all__ = [
    "SAMPLE_RATE",
    "HOP",
    "KERNEL",
    "CHUNK_SAMPLES",
    "MIN_SAMPLES",
    "SILENCE_PEAK",
    "load_audio",
    "save_wav",
    "resample",
    "hubert_num_frames",
    "check_waveform",
    "HubertExtractor",
    "main",
]

HOP = 320  # HuBERT feature stride in samples (20 ms at 16 kHz -> 50 Hz)
KERNEL = 400  # receptive field of one feature frame (25 ms)
CHUNK_FRAMES = 1000  # features per full chunk
CHUNK_SAMPLES = HOP * CHUNK_FRAMES  # 20 s at 16 kHz: start offset between chunks
MIN_SAMPLES = KERNEL  # shortest waveform that yields one feature frame
SILENCE_PEAK = 1e-4  # a waveform whose peak |amplitude| is below this (-80 dBFS) counts as silence

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".aiff", ".aif", ".wma")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".flv", ".mpg", ".mpeg")
_SOUNDFILE_FIRST = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")


# ------------------------------------------------------------------------------------------------
# loading


def hubert_num_frames(num_samples: int) -> int:
    """Number of 50 Hz HuBERT frames for ``num_samples`` 16 kHz samples: ``(N - 80) // 320``."""
    return max(0, (int(num_samples) - (KERNEL - HOP)) // HOP)


def resample(wave: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited polyphase resampling (``scipy.signal.resample_poly``) along axis 0."""
    orig_rate, target_rate = int(orig_rate), int(target_rate)
    if orig_rate <= 0 or target_rate <= 0:
        raise UserError(f"invalid sample rates {orig_rate} -> {target_rate}")
    if orig_rate == target_rate:
        return np.ascontiguousarray(wave, dtype=np.float32)
    g = math.gcd(orig_rate, target_rate)
    out = resample_poly(np.asarray(wave, dtype=np.float64), target_rate // g, orig_rate // g, axis=0)
    return np.ascontiguousarray(out, dtype=np.float32)


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [N, C]
    return data, int(rate)


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any container (m4a, mp3, mp4, mkv, ...) to float32 [N, C]."""
    with av.open(str(path), mode="r") as container:
        if not container.streams.audio:
            raise UserError(f"{path} has no audio track; pass an audio file or a video with sound (--audio)")
        stream = container.streams.audio[0]
        # Only the sample format changes here (planar float); rate and layout stay as decoded, the
        # rate conversion is done once, with the same polyphase filter for every input type.
        resampler = av.AudioResampler(format="fltp")
        parts: list[np.ndarray] = []
        rate = None
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                rate = out.sample_rate
                parts.append(out.to_ndarray().reshape(len(out.layout.channels), -1))
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(len(out.layout.channels), -1))
        if rate is None:
            rate = stream.codec_context.sample_rate or stream.rate
        if not parts:
            return np.zeros((0, 1), np.float32), int(rate or SAMPLE_RATE)
        channels = max(p.shape[0] for p in parts)
        parts = [p if p.shape[0] == channels else np.repeat(p[:1], channels, axis=0) for p in parts]
        return np.concatenate(parts, axis=1).T.astype(np.float32, copy=False), int(rate)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file or a video's audio track as float32 mono at ``sample_rate``: ``[N]``.

    wav/flac/ogg/mp3 go through soundfile (libsndfile), anything else (m4a, aac, mp4, mkv, ...)
    through PyAV; when the first reader fails the other one is tried. Channels are averaged to
    mono (the original kept channel 0 only; averaging is the usual downmix and equal for dual-mono
    recordings) and the signal is resampled with a polyphase low-pass filter.
    """
    path = require_file(path, "audio file")
    readers = (_read_soundfile, _read_pyav)
    if path.suffix.lower() not in _SOUNDFILE_FIRST:
        readers = (_read_pyav, _read_soundfile)
    errors = []
    for reader in readers:
        try:
            data, rate = reader(path)
            break
        except UserError:
            raise
        except (sf.LibsndfileError, RuntimeError, av.FFmpegError, OSError, ValueError, TypeError) as exc:
            errors.append(exc)
    else:
        pyav = next((e for e in errors if isinstance(e, av.FFmpegError)), errors[-1])
        raise UserError(
            f"cannot read audio from {path}: {media_problem(path, pyav)}; pass a wav, flac, mp3 or m4a "
            "file or a video with an audio track"
        )
    if data.shape[0] == 0:
        raise UserError(f"{path} contains no audio samples; pass a file with speech in it")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    mono = resample(mono, rate, sample_rate)
    if not np.isfinite(mono).all():
        raise UserError(f"{path} contains NaN or infinite samples; re-export the audio")
    return mono


def save_wav(path: str | Path, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write a mono float waveform as 16-bit PCM wav (atomically)."""
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(np.asarray(wave, np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16")


def check_waveform(wave: np.ndarray, name: str = "audio", min_samples: int = MIN_SAMPLES) -> np.ndarray:
    """Validate a 16 kHz mono waveform for HuBERT: 1-D, finite, long enough, not silent."""
    wave = np.asarray(wave)
    if wave.ndim == 2 and 1 in wave.shape:
        wave = wave.reshape(-1)
    if wave.ndim != 1:
        raise UserError(f"{name}: expected a mono waveform [N], got shape {tuple(wave.shape)}")
    wave = wave.astype(np.float32, copy=False)
    if not np.isfinite(wave).all():
        raise UserError(f"{name}: waveform contains NaN or infinite samples")
    if wave.shape[0] < min_samples:
        raise UserError(
            f"{name}: audio too short ({wave.shape[0]} samples = {wave.shape[0] / SAMPLE_RATE:.3f} s at "
            f"16 kHz; at least {min_samples} samples = {min_samples / SAMPLE_RATE:.3f} s needed)"
        )
    peak = float(np.abs(wave).max())
    if peak < SILENCE_PEAK:
        raise UserError(f"{name}: audio is silent (peak amplitude {peak:.2e}); pass a recording with speech")
    return wave


# ------------------------------------------------------------------------------------------------
# HuBERT

_MODEL_CACHE: dict[tuple[str, str], tuple[object, object]] = {}


def _looks_like_hub_id(name: str) -> bool:
    """``org/name`` (or ``name``) that is not a local path such as ``checkpoints/hubert``."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    parts = name.split("/")
    if len(parts) > 2:
        return False
    return not (len(parts) == 2 and Path(parts[0]).is_dir())


def _missing_model_message(name: str, reason: str) -> str:
    return (
        f"HuBERT model {name!r} not available ({reason}); download facebook/hubert-large-ls960-ft into "
        "checkpoints/hubert-large-ls960-ft (or pass a hub id with --allow_download); "
        "see `python -m moditalker.assets check`"
    )


def _load_pretrained(model_name_or_path: str, local_files_only: bool):
    from transformers import AutoFeatureExtractor, HubertModel, Wav2Vec2FeatureExtractor

    path = Path(model_name_or_path).expanduser()
    if path.exists() or not _looks_like_hub_id(str(model_name_or_path)):
        if not path.is_dir():
            raise UserError(_missing_model_message(str(path), "folder not found"))
        if not (path / "config.json").is_file():
            raise UserError(_missing_model_message(str(path), "no config.json in the folder"))
        source, local = str(path), True
    else:
        source, local = str(model_name_or_path), local_files_only
    try:
        model = HubertModel.from_pretrained(source, local_files_only=local).float()
    except (OSError, ValueError) as exc:
        why = "not in the local Hugging Face cache" if local and source == str(model_name_or_path) else exc
        raise UserError(_missing_model_message(source, str(why).splitlines()[0])) from exc
    try:
        extractor = AutoFeatureExtractor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError):
        # Folders holding only the model weights: use the hub default of hubert-large-ls960-ft
        # (zero-mean / unit-variance normalisation of the waveform).
        extractor = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=SAMPLE_RATE)
    return model, extractor


class HubertExtractor:
    """HuBERT ``last_hidden_state`` features of a 16 kHz waveform: ``float32 [(N - 80) // 320, hidden]``.

    ``model_name_or_path`` is a local ``transformers`` folder (config.json + weights, optionally
    preprocessor_config.json) or, with ``local_files_only=False``, a hub id such as
    ``facebook/hubert-large-ls960-ft``. Models are cached per process, so building several
    extractors for the same folder loads the weights once.
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        device: str | torch.device = "cpu",
        local_files_only: bool = True,
        batch_size: int = 4,
        *,
        _model=None,
        _feature_extractor=None,
    ) -> None:
        self.device = resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        self.name = str(model_name_or_path)
        if _model is None:
            where = Path(self.name).expanduser()
            key = (str(where.resolve()) if where.exists() else self.name, str(self.device))
            if key not in _MODEL_CACHE:
                _MODEL_CACHE[key] = _load_pretrained(self.name, local_files_only)
            _model, _feature_extractor = _MODEL_CACHE[key]
        self.model = _model.to(self.device).eval()
        self.feature_extractor = _feature_extractor
        self.hidden_size = int(self.model.config.hidden_size)
        self._check_geometry()

    def _check_geometry(self) -> None:
        cfg = self.model.config
        stride = int(np.prod(cfg.conv_stride))
        receptive = 1
        for k, s in zip(reversed(cfg.conv_kernel), reversed(cfg.conv_stride)):
            receptive = (receptive - 1) * s + k
        if stride != HOP or receptive != KERNEL:
            raise UserError(
                f"HuBERT model {self.name}: front end has stride {stride} and kernel {receptive}, "
                f"expected {HOP} and {KERNEL} (a 50 Hz HuBERT/wav2vec2-style model)"
            )

    @classmethod
    def random(
        cls,
        hidden_size: int = 1024,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_layers: int = 2,
        num_heads: int = 4,
        conv_dim: int = 32,
        batch_size: int = 4,
    ) -> HubertExtractor:
        """A small randomly initialised HuBERT with the real 400/320 front end (for ``--random_weights``).

        The features are meaningless, but every shape and length matches the real model, so the
        whole pipeline can be exercised without downloading weights.
        """
        from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

        if hidden_size < 1 or hidden_size % num_heads:
            raise UserError(
                f"hidden_size must be a positive multiple of num_heads {num_heads}, got {hidden_size}"
            )
        groups = math.gcd(16, hidden_size)
        config = HubertConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=2 * hidden_size,
            conv_dim=(conv_dim,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=groups,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            conv_bias=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = HubertModel(config)
        extractor = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=SAMPLE_RATE)
        return cls(
            f"random-hubert(hidden={hidden_size},seed={seed})",
            device=device,
            batch_size=batch_size,
            _model=model,
            _feature_extractor=extractor,
        )

    def normalize(self, wave: np.ndarray) -> np.ndarray:
        """Apply the model's feature extractor (zero mean / unit variance for hubert-large-ls960-ft)."""
        values = self.feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values
        return np.asarray(values[0], dtype=np.float32)

    @staticmethod
    def chunk_bounds(num_samples: int) -> list[tuple[int, int]]:
        """Sample ranges of the 20 s chunks: ``[i*320000, i*320000 + 320080)`` and a >= 400-sample tail."""
        n_full = num_samples // CHUNK_SAMPLES
        bounds = [(i * CHUNK_SAMPLES, min(i * CHUNK_SAMPLES + CHUNK_SAMPLES + KERNEL - HOP, num_samples))
                  for i in range(n_full)]  # fmt: skip
        start = n_full * CHUNK_SAMPLES
        if num_samples - start >= KERNEL:
            bounds.append((start, num_samples))
        return bounds

    @torch.inference_mode()
    def __call__(self, wave: np.ndarray, name: str = "audio") -> np.ndarray:
        """Features of a 16 kHz mono waveform ``[N]`` -> ``float32 [(N - 80) // 320, hidden]``."""
        wave = check_waveform(wave, name)
        values = self.normalize(wave)
        expected = hubert_num_frames(len(values))
        bounds = self.chunk_bounds(len(values))
        outputs: list[np.ndarray | None] = [None] * len(bounds)
        # Chunks of equal length run together in batches (no padding, so results equal one-by-one runs).
        by_length: dict[int, list[int]] = {}
        for i, (a, b) in enumerate(bounds):
            by_length.setdefault(b - a, []).append(i)
        for length, idx in by_length.items():
            for j in range(0, len(idx), self.batch_size):
                group = idx[j : j + self.batch_size]
                batch = np.stack([values[bounds[i][0] : bounds[i][0] + length] for i in group])
                with original_attention(self.device):
                    hidden = self.model(torch.from_numpy(batch).to(self.device)).last_hidden_state
                hidden = hidden.float().cpu().numpy()
                for k, i in enumerate(group):
                    outputs[i] = hidden[k]
        feats = np.concatenate(outputs, axis=0) if outputs else np.zeros((0, self.hidden_size), np.float32)
        # The chunk lengths add up to `expected` exactly; pad/trim only guards exotic front ends.
        if feats.shape[0] < expected:
            feats = np.pad(feats, ((0, expected - feats.shape[0]), (0, 0)))
        return np.ascontiguousarray(feats[:expected], dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# CLI


def _collect_inputs(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in p.iterdir()
                if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS + VIDEO_EXTENSIONS
            )
            if not found:
                raise UserError(f"no audio or video files in folder {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"audio file not found: {p}")
    return files


def build_parser() -> argparse.ArgumentParser:
    from moditalker.assets import default_path

    ap = argparse.ArgumentParser(
        prog=script_prog("python -m data.audio"),
        description="16 kHz mono audio and HuBERT features (float32 [T, 1024] at 50 Hz) for AToM.",
    )
    ap.add_argument("--audio", nargs="+", required=True, help="audio/video files or folders of them")
    ap.add_argument("--out_dir", default="outputs/hubert", help="writes {out_dir}/{stem}.npy")
    ap.add_argument(
        "--out",
        default=None,
        help="output .npy path (single input only); its settings go to X.yaml beside it",
    )
    ap.add_argument("--wav_dir", default=None, help="also write the 16 kHz mono wav as {wav_dir}/{stem}.wav")
    ap.add_argument("--model", default=str(default_path("hubert")), help="HuBERT folder or hub id")
    ap.add_argument("--allow_download", action="store_true", help="let transformers fetch a hub id")
    ap.add_argument("--random_weights", action="store_true", help="tiny random HuBERT (smoke tests)")
    ap.add_argument("--hidden_size", type=int, default=1024, help="feature size with --random_weights")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    ap.add_argument("--batch_size", type=int, default=4, help="20 s chunks per forward pass")
    ap.add_argument("--min_duration", type=float, default=0.5, help="reject audio shorter than this (s)")
    ap.add_argument("--skip_existing", action="store_true", help="skip inputs whose .npy already exists")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return ap


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Extract HuBERT features for every input; returns the written ``.npy`` paths."""
    args = build_parser().parse_args(argv)
    if not (math.isfinite(args.min_duration) and args.min_duration >= 0):
        raise UserError(f"--min_duration must be a number of seconds >= 0, got {args.min_duration}")
    if args.out is not None and Path(args.out).suffix != ".npy":
        raise UserError(f"--out must end in .npy, got {args.out}")
    inputs = _collect_inputs(args.audio)
    if args.out is not None and len(inputs) != 1:
        raise UserError(f"--out takes a single input, got {len(inputs)}; use --out_dir for several")
    stems = [p.stem for p in inputs]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise UserError(f"several inputs share the name(s) {dupes}; outputs would collide, rename them")
    outs = [Path(args.out) if args.out else Path(args.out_dir) / f"{p.stem}.npy" for p in inputs]
    todo = []
    for src, out in zip(inputs, outs):
        if args.skip_existing and out.exists():
            continue
        check_output(out, args.overwrite, inputs)
        if args.wav_dir:
            check_output(Path(args.wav_dir) / f"{src.stem}.wav", args.overwrite, inputs)
        todo.append((src, out))
    # the run's settings: beside --out as X.yaml (an output like X.npy: never replaced unasked), or the
    # folder's hubert_config.yaml, which every run that writes into --out_dir replaces with its own
    cfg_path = Path(args.out).with_suffix(".yaml") if args.out else Path(args.out_dir) / "hubert_config.yaml"
    if todo:
        check_output(cfg_path, args.overwrite or not args.out, inputs)
    # every input read and checked before the network is built: a bad file stops the run before any
    # output (or warning); one input is read once, several again as they are extracted (bounded memory)
    min_samples = max(MIN_SAMPLES, int(round(args.min_duration * SAMPLE_RATE)))
    checked: dict[Path, np.ndarray] = {}
    for src, _ in tqdm(todo, desc="checking audio", unit="file", disable=len(todo) < 2):
        wave = check_waveform(load_audio(src), str(src), min_samples=min_samples)
        if len(todo) == 1:
            checked[src] = wave
    if args.random_weights:
        extractor = HubertExtractor.random(args.hidden_size, device=args.device, batch_size=args.batch_size)
        warn_random_weights("HuBERT is", "Its features do NOT describe the speech.")
    else:
        extractor = HubertExtractor(
            args.model,
            device=args.device,
            local_files_only=not args.allow_download,
            batch_size=args.batch_size,
        )
    written = []
    for src, out in tqdm(todo, desc="hubert", unit="file", disable=len(todo) < 2):
        wave = checked.pop(src, None)
        if wave is None:
            wave = check_waveform(load_audio(src), str(src), min_samples=min_samples)
        feats = extractor(wave, name=str(src))
        save_npy(out, feats)
        if args.wav_dir:
            save_wav(Path(args.wav_dir) / f"{src.stem}.wav", wave)
        written.append(out)
        print(f"{src} -> {out} {tuple(feats.shape)}")
    if written:
        from moditalker.config import save_config

        cfg = dict(vars(args), model_used=extractor.name, hidden_size_used=extractor.hidden_size)
        save_config(cfg, cfg_path)
    return written


if __name__ == "__main__":
    cli_main(main)
