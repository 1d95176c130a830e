"""End to end: speech audio + reference video (or photo) -> talking-head mp4 with the audio muxed in.

Stages (each cached in the work folder under a hash of its inputs and settings, see
:mod:`pipeline.cache`):

1. ``reference``  reference video -> 25 fps -> centre crop 256x256 (or one photo);
2. ``landmarks``  FAN 68-point 2D landmarks of the reference frames;
3. ``recon``      Deep3DFaceRecon 257 3DMM coefficients of the reference frames;
4. ``hubert``     audio -> 16 kHz -> HuBERT features (50 Hz);
5. ``atom``       AToM -> frontal 3D landmarks for the whole audio (2 HuBERT frames per video frame);
6. ``align``      frontal landmarks re-posed onto the reference frames (played back and forth when
                  the audio is longer than the video) -> pixel landmarks, rendered dot video (PNGs);
7. ``mtov``       MToV -> 256x256 frames, in batches of 16-frame clips;
then the H.264 mp4 (25 fps) with the input audio as AAC, an optional side-by-side preview
(landmarks | generated), and the resolved config next to the output.

``python -m pipeline.inference --audio A.wav --ref_video V.mp4 --out OUT.mp4 [key=value ...]``
(also ``scripts/inference.sh``). Bad inputs and missing assets stop the run before any heavy
work with one ``error:`` line and exit status 2; nothing is written at the output path unless the
run succeeds.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from moditalker.config import load_config, save_config
from moditalker.constants import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from moditalker.errors import UserError, cli_main
from moditalker.fileio import check_output
from moditalker.timing import StageTimer
from pipeline.cache import WorkCache, asset_identity, file_digest

__all__ = [
    "DEFAULTS",
    "REQUIRED_ASSETS",
    "PipelineResult",
    "build_parser",
    "resolve_config",
    "run_inference",
    "main",
]

REPO = Path(__file__).resolve().parents[1]

# Defaults of every setting; configs/inference.yaml spells the same tree out with comments.
DEFAULTS: dict[str, Any] = {
    "audio": None,
    "ref_video": None,
    "ref_image": None,
    "out": None,
    "work_dir": None,  # default: <out folder>/<out stem>_work
    "ref_frame": 0,
    "device": "auto",
    "seed": 0,
    "size": 256,
    "random_weights": False,
    "preview": False,
    "overwrite": False,
    "min_audio_seconds": 0.5,
    # asset paths; null = the default location of moditalker.assets (checkpoints/...)
    "assets": {
        "atom": None,
        "autoencoder_rgb": None,
        "autoencoder_motion": None,
        "diffusion_model": None,
        "bfm_dir": None,
        "deep3d": None,
        "hubert": None,
        "face_alignment": None,
    },
    "hubert": {"batch_size": 4, "random_hidden_size": None},
    "reference": {"max_frames": None},  # null: as many frames as the audio needs
    "atom": {
        "config": None,  # passed to AToM.inference.load_atom (null: its default, the official sizes)
        "ema": False,
        "steps": 50,
        "eta": 1.0,
        "guidance_weight": 2.0,
        "seed": None,  # null: the top-level seed
    },
    "mtov": {
        "config": None,  # passed to MToV.sample.load_mtov
        "batch_size": 4,
        "start_ratio": 0.25,
        "sampling_timesteps": 100,
        "use_last_as_reference": False,
        "precision": "auto",  # autoencoders: auto = bf16 autocast where the device has bf16 units; fp32
        "seed": None,  # null: the top-level seed
    },
    "output": {"crf": 18, "preset": "medium"},
}

# moditalker.assets names the pipeline needs (bfm_dir covers bfm_front + bfm_similarity)
REQUIRED_ASSETS = (
    "hubert",
    "face_alignment",
    "deep3d",
    "bfm_front",
    "bfm_similarity",
    "atom",
    "autoencoder_rgb",
    "autoencoder_motion",
    "diffusion_model",
)

RANDOM_WARNING = """\
################################################################################
#  WARNING: --random_weights: every network (HuBERT, FAN, Deep3DFaceRecon,     #
#  AToM, MToV) is RANDOMLY INITIALISED and the BFM is SYNTHETIC.               #
#  The video this produces is NOT a talking head; it only exercises the        #
#  pipeline. Put the real checkpoints in checkpoints/ for real results         #
#  (see `python -m moditalker.assets check`).                                        #
################################################################################"""


@dataclass
class PipelineResult:
    """What a run produced: output paths, per-stage records and timings."""

    out: Path
    preview: Path | None
    config_path: Path
    work_dir: Path
    n_frames: int
    audio_seconds: float
    stages: dict[str, Any] = field(default_factory=dict)  # name -> StageRecord
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- configuration
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.inference",
        description="Audio + reference video (or photo) -> talking-head mp4 (AToM + alignment + MToV).",
        epilog="Any setting can also be given as key=value (e.g. atom.steps=25 mtov.batch_size=8).",
    )
    p.add_argument("--audio", help="speech: wav/flac/mp3/m4a or a video with an audio track")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref_video", help="reference video: identity, head pose and background")
    ref.add_argument("--ref_image", help="a single reference photo instead (static pose)")
    p.add_argument("--out", help="output .mp4 (H.264 25 fps 256x256 + AAC)")
    p.add_argument("--config", default=None, help="YAML config (default: configs/inference.yaml)")
    p.add_argument("--ref_frame", type=int, default=None, help="frame giving the reference landmark [0]")
    p.add_argument("--preview", action="store_true", default=None, help="also write OUT_preview.mp4")
    p.add_argument("--seed", type=int, default=None, help="seed of both diffusion samplers [0]")
    p.add_argument("--steps", type=int, default=None, help="AToM DDIM steps (atom.steps) [50]")
    p.add_argument("--guidance", type=float, default=None, help="AToM CFG weight (atom.guidance_weight) [2]")
    p.add_argument("--mtov_steps", type=int, default=None, help="MToV DDIM schedule length [100]")
    p.add_argument("--batch_size", type=int, default=None, help="MToV clips per batch (mtov.batch_size) [4]")
    p.add_argument("--device", default=None, help="auto|cpu|cuda|cuda:N [auto]")
    p.add_argument("--work_dir", default=None, help="cache folder [<out folder>/<out stem>_work]")
    p.add_argument(
        "--random_weights",
        action="store_true",
        default=None,
        help="random networks + synthetic BFM: exercises the pipeline without the licensed assets",
    )
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


_FLAG_TO_KEY = {
    "audio": "audio",
    "ref_video": "ref_video",
    "ref_image": "ref_image",
    "out": "out",
    "ref_frame": "ref_frame",
    "preview": "preview",
    "seed": "seed",
    "steps": "atom.steps",
    "guidance": "atom.guidance_weight",
    "mtov_steps": "mtov.sampling_timesteps",
    "batch_size": "mtov.batch_size",
    "device": "device",
    "work_dir": "work_dir",
    "random_weights": "random_weights",
    "overwrite": "overwrite",
}


def resolve_config(args: argparse.Namespace) -> DictConfig:
    """defaults <- YAML (--config, else configs/inference.yaml) <- flags <- key=value overrides."""
    from omegaconf.errors import OmegaConfBaseException

    path = args.config if args.config is not None else REPO / "configs" / "inference.yaml"
    if args.config is None and not Path(path).is_file():
        path = None
    cfg = load_config(path, (), defaults=DEFAULTS)
    for name, key in _FLAG_TO_KEY.items():
        value = getattr(args, name)
        if value is None:
            continue
        try:  # set as is: a path such as "it's a.wav" or "123" is not re-parsed as YAML
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as exc:
            raise UserError(f"cannot set {key} from --{name}: {str(exc).splitlines()[0]}") from exc
    cfg = load_config(None, list(args.overrides), defaults=cfg)
    for stage in ("atom", "mtov"):  # (a section that is not a mapping is reported by _check_settings)
        if OmegaConf.is_dict(cfg.get(stage)) and cfg[stage].get("seed") is None:
            cfg[stage].seed = cfg.get("seed")
    return cfg


# ----------------------------------------------------------------------------- validation
@dataclass
class _Inputs:
    audio: Path
    ref: Path
    ref_is_image: bool
    out: Path
    preview: Path | None
    config_path: Path
    work_dir: Path
    audio_rate: int


def _check_writable(folder: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(
            f"output folder {folder} is not writable ({exc.strerror}); choose another --out"
        ) from exc


X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
_INT, _FLOAT, _BOOL, _STR = "an integer", "a number", "true or false", "a string"
# every leaf of DEFAULTS: (kind, may be null, check on the value, what the check asks for)
_SETTINGS: dict[str, tuple[str, bool, Callable[[Any], bool] | None, str]] = {
    "audio": (_STR, True, None, ""),
    "ref_video": (_STR, True, None, ""),
    "ref_image": (_STR, True, None, ""),
    "out": (_STR, True, None, ""),
    "work_dir": (_STR, True, None, ""),
    "ref_frame": (_INT, False, lambda v: v >= 0, ">= 0"),
    "device": (_STR, False, None, ""),
    "seed": (_INT, False, lambda v: 0 <= v < 2**63, "in 0..2**63-1"),
    "size": (_INT, False, lambda v: v >= 32, ">= 32"),
    "random_weights": (_BOOL, False, None, ""),
    "preview": (_BOOL, False, None, ""),
    "overwrite": (_BOOL, False, None, ""),
    "min_audio_seconds": (_FLOAT, False, lambda v: v >= 0, ">= 0"),
    **{f"assets.{k}": (_STR, True, None, "") for k in DEFAULTS["assets"]},
    "hubert.batch_size": (_INT, False, lambda v: v >= 1, ">= 1"),
    "hubert.random_hidden_size": (_INT, True, lambda v: v >= 4 and v % 4 == 0, "a positive multiple of 4"),
    "reference.max_frames": (_INT, True, lambda v: v >= 1, ">= 1"),
    "atom.ema": (_BOOL, False, None, ""),
    "atom.steps": (_INT, False, lambda v: v >= 1, ">= 1"),
    "atom.eta": (_FLOAT, False, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "atom.guidance_weight": (_FLOAT, False, None, ""),
    "atom.seed": (_INT, True, lambda v: 0 <= v < 2**63, "in 0..2**63-1"),
    "mtov.batch_size": (_INT, False, lambda v: v >= 1, ">= 1"),
    "mtov.start_ratio": (_FLOAT, False, lambda v: 0 < v < 1, "in (0, 1)"),
    "mtov.sampling_timesteps": (_INT, False, lambda v: v >= 1, ">= 1"),
    "mtov.use_last_as_reference": (_BOOL, False, None, ""),
    "mtov.precision": (_STR, False, lambda v: v in ("auto", "bf16", "fp32"), "one of auto, bf16, fp32"),
    "mtov.seed": (_INT, True, lambda v: 0 <= v < 2**63, "in 0..2**63-1"),
    "output.crf": (_INT, False, lambda v: 0 <= v <= 51, "in 0..51"),
    "output.preset": (
        _STR,
        False,
        lambda v: v in X264_PRESETS,
        f"an x264 preset ({', '.join(X264_PRESETS)})",
    ),
}
_FREE_FORM = ("atom.config", "mtov.config")  # a YAML path or an inline mapping, checked by the loaders
_IGNORED = ("run",)  # written into OUT.yaml by a finished run; that file may be passed as --config


def _check_settings(cfg: DictConfig) -> None:
    """Every setting known, of the right type and in range: a typo such as ``atom.stesp=10`` or a
    value such as ``atom.steps=abc`` stops the run here, not as a traceback deep inside a stage."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # noqa: BLE001 - interpolation errors in the user's YAML
        raise UserError(f"bad config: {exc}") from exc

    def walk(node: dict, defaults: dict, prefix: str) -> None:
        unknown = [f"{prefix}{k}" for k in node if k not in defaults and f"{prefix}{k}" not in _IGNORED]
        if unknown:
            raise UserError(
                f"unknown setting(s) {unknown}; see configs/inference.yaml for the keys "
                f"(sections: {', '.join(k for k, v in DEFAULTS.items() if isinstance(v, dict))})"
            )
        for key, default in defaults.items():
            name = f"{prefix}{key}"
            value = node.get(key)
            if name in _FREE_FORM:
                if value is not None and not isinstance(value, str | dict):
                    raise UserError(f"{name} must be a YAML path or a mapping, got {value!r}")
            elif isinstance(default, dict):
                if not isinstance(value, dict):
                    raise UserError(f"{name} must be a section of settings ({name}.KEY=VALUE), got {value!r}")
                walk(value, default, f"{name}.")
            else:
                _check_value(name, value)

    walk(plain, DEFAULTS, "")
    m = cfg.mtov
    from MToV.generate import check_sampling

    check_sampling(float(m.start_ratio), int(m.sampling_timesteps))


def _check_value(name: str, value: Any) -> None:
    kind, nullable, ok, wanted = _SETTINGS[name]
    if value is None:
        if nullable:
            return
        raise UserError(f"{name} must be {kind}, got null")
    good_type = {
        _INT: isinstance(value, int) and not isinstance(value, bool),
        _FLOAT: isinstance(value, int | float) and not isinstance(value, bool),
        _BOOL: isinstance(value, bool),
        _STR: isinstance(value, str),
    }[kind]
    if not good_type:
        raise UserError(f"{name} must be {kind}, got {value!r}")
    if kind == _FLOAT and not np.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    if ok is not None and not ok(value):
        raise UserError(f"{name} must be {wanted}, got {value!r}")


def _validate(cfg: DictConfig) -> _Inputs:
    """Every check that is cheap: settings, arguments, paths, output writability, media streams."""
    from data.video import probe

    _check_settings(cfg)
    if not cfg.audio:
        raise UserError("--audio is required (a speech recording, or a video with an audio track)")
    if not cfg.ref_video and not cfg.ref_image:
        raise UserError("a reference is required: --ref_video VIDEO or --ref_image PHOTO")
    if cfg.ref_video and cfg.ref_image:
        raise UserError("give either --ref_video or --ref_image, not both")
    if not cfg.out:
        raise UserError("--out is required (the .mp4 to write)")
    out = Path(cfg.out)
    if out.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        raise UserError(f"--out {out}: use an .mp4 (or .mov/.mkv) file name")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'result.mp4'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"cannot write {out}: {out.parent} is a file, not a folder")
    overwrite = bool(cfg.overwrite)
    check_output(out, overwrite)
    _check_writable(out.parent if str(out.parent) else Path("."))
    preview = out.with_name(out.stem + "_preview" + out.suffix) if cfg.preview else None
    if preview is not None:
        check_output(preview, overwrite)
    config_path = out.with_suffix(".yaml")
    check_output(config_path, overwrite)
    work_dir = Path(cfg.work_dir) if cfg.work_dir else out.with_name(out.stem + "_work")
    if work_dir.exists() and not work_dir.is_dir():
        raise UserError(f"work folder {work_dir} exists and is not a folder; pass --work_dir")

    audio = Path(cfg.audio)
    info = probe(audio)  # UserError for missing/unreadable files
    if info["audio"] is None:
        raise UserError(f"{audio} has no audio track; pass a speech recording or a video with sound")
    ref = Path(cfg.ref_image or cfg.ref_video)
    ref_is_image = bool(cfg.ref_image)
    if ref_is_image:
        from data.video import read_image

        read_image(ref)  # cheap decode check
    else:
        rinfo = probe(ref)
        if rinfo["video"] is None:
            raise UserError(f"{ref} has no video stream; pass a video, or a photo with --ref_image")
        from data.video import read_video

        read_video(ref, fps=FPS, max_frames=1)  # headers can be fine and the frames not decode
    _plain(cfg.atom.config)  # a stage config file that does not exist fails here, before any work
    _plain(cfg.mtov.config)
    if int(cfg.ref_frame) < 0:
        raise UserError(f"--ref_frame must be >= 0, got {cfg.ref_frame}")
    rate = int(info["audio"]["sample_rate"] or SAMPLE_RATE)
    return _Inputs(audio, ref, ref_is_image, out, preview, config_path, work_dir, rate)


def _asset_paths(cfg: DictConfig) -> dict[str, Path]:
    """moditalker.assets name -> path (config value, else the registry default)."""
    from moditalker.assets import default_path

    a = cfg.assets
    bfm_dir = Path(a.bfm_dir) if a.bfm_dir else default_path("bfm_front").parent
    paths = {
        "hubert": a.hubert,
        "face_alignment": a.face_alignment,
        "deep3d": a.deep3d,
        "atom": a.atom,
        "autoencoder_rgb": a.autoencoder_rgb,
        "autoencoder_motion": a.autoencoder_motion,
        "diffusion_model": a.diffusion_model,
    }
    out = {k: Path(v) if v else default_path(k) for k, v in paths.items()}
    out["bfm_front"] = bfm_dir / "BFM_model_front.mat"
    out["bfm_similarity"] = bfm_dir / "similarity_Lm3D_all.mat"
    return out


def _check_assets(cfg: DictConfig) -> dict[str, Path]:
    from moditalker.assets import check_assets

    paths = _asset_paths(cfg)
    if cfg.random_weights:
        return paths
    missing = check_assets(REQUIRED_ASSETS, {k: paths[k] for k in REQUIRED_ASSETS})
    if missing:
        lines = "\n".join(f"  {m}" for m in missing)
        raise UserError(
            f"{len(missing)} required asset(s) missing (or run with --random_weights to test the pipeline):\n"
            + lines
        )
    return paths


# ----------------------------------------------------------------------------- helpers
def _write_pngs(folder: Path, frames_chw: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames_chw):
        Image.fromarray(np.ascontiguousarray(frame.transpose(1, 2, 0))).save(folder / f"{i:05d}.png")


# ----------------------------------------------------------------------------- the run
_log = functools.partial(print, flush=True)


def run_inference(
    cfg: DictConfig,
    *,
    log: Callable[[str], None] = _log,
    progress: bool = True,
    detector: Any = None,
) -> PipelineResult:
    """Run the whole pipeline for a resolved config (see :func:`resolve_config`).

    ``detector`` replaces FAN and s3fd inside :class:`data.landmarks.FaceLandmarkDetector` (a
    callable on uint8 frame batches returning per-frame ``[68, 2]`` landmarks or None), e.g. to
    test the no-face path; with ``random_weights`` the default is
    :func:`data.landmarks.template_face_detector` (random FAN/s3fd weights find no face).
    """
    t_total = time.perf_counter()
    timings: dict[str, float] = {}
    inputs = _validate(cfg)
    paths = _check_assets(cfg)

    from data.audio import check_waveform, load_audio

    wave = load_audio(inputs.audio, SAMPLE_RATE)
    seconds = len(wave) / SAMPLE_RATE
    if seconds < float(cfg.min_audio_seconds):
        raise UserError(
            f"{inputs.audio} holds {seconds:.2f} s of audio; at least {cfg.min_audio_seconds} s is needed"
        )
    check_waveform(wave, str(inputs.audio))  # silence / NaN: fail now, not after the reference stages
    if cfg.random_weights:
        print(RANDOM_WARNING, file=sys.stderr, flush=True)

    from moditalker.device import resolve_device

    device = resolve_device(cfg.device)
    size = int(cfg.size)
    # video frames: the audio's duration at 25 fps, rounded; the waveform is zero-padded for
    # HuBERT so that AToM's T_a // 2 frames cover exactly that many frames
    n_frames = max(1, int(round(len(wave) / SAMPLES_PER_FRAME)))
    need = n_frames * SAMPLES_PER_FRAME + 80
    hubert_wave = np.pad(wave, (0, max(0, need - len(wave))))[:need]
    log(f"audio {inputs.audio}: {seconds:.2f} s -> {n_frames} frames at {FPS} fps; device {device}")

    cache = WorkCache(inputs.work_dir)
    save_config(cfg, inputs.work_dir / "config.yaml")
    rw = bool(cfg.random_weights)
    if rw:
        from data.face3d import write_synthetic_bfm

        bfm_dir = inputs.work_dir / "synthetic_bfm"
        if not (bfm_dir / "BFM_model_front.mat").is_file():
            write_synthetic_bfm(bfm_dir, seed=int(cfg.seed))
    else:
        bfm_dir = paths["bfm_front"].parent
    bfm_id = f"synthetic:{cfg.seed}" if rw else asset_identity(paths["bfm_front"])

    # 1. reference frames --------------------------------------------------------------------
    max_ref = n_frames if cfg.reference.max_frames is None else min(n_frames, int(cfg.reference.max_frames))
    max_ref = max(max_ref, int(cfg.ref_frame) + 1)

    def _reference(_: Path) -> dict[str, np.ndarray]:
        from data.imageops import resize_crop
        from data.video import read_image, read_video

        if inputs.ref_is_image:
            raw = read_image(inputs.ref)[None]
        else:
            raw, _fps = read_video(inputs.ref, fps=FPS, max_frames=max_ref)
        return {"frames": resize_crop(raw, size)}

    ref, ref_key = cache.run(
        "reference",
        {
            "file": file_digest(inputs.ref),
            "image": inputs.ref_is_image,
            "size": size,
            "max_frames": 1 if inputs.ref_is_image else max_ref,
        },
        _reference,
        log,
    )
    frames = ref["frames"]
    n_ref = len(frames)
    ref_frame = int(cfg.ref_frame)
    if ref_frame >= n_ref:
        raise UserError(f"--ref_frame {ref_frame} is past the end of {inputs.ref} ({n_ref} frames)")

    # 2. FAN landmarks -----------------------------------------------------------------------
    def _landmarks(_: Path) -> dict[str, np.ndarray]:
        from data.landmarks import FaceLandmarkDetector, template_face_detector

        injected = detector if detector is not None else (template_face_detector if rw else None)
        det = FaceLandmarkDetector(
            device=device,
            weights_dir=cfg.assets.face_alignment or None,  # None: checkpoints/ or the torch-hub cache
            detector=injected,
        )
        lm68, n_interp = det.detect(frames, progress=progress, source=str(inputs.ref))
        if n_interp:
            log(f"[landmarks] no face in {n_interp} of {n_ref} reference frames: interpolated")
        return {"lm68": np.asarray(lm68, np.float32)}

    if detector is not None:  # not reusable across processes: key on the object itself
        det_id = f"injected:{getattr(detector, '__qualname__', type(detector).__name__)}:{id(detector)}"
    else:
        det_id = "template" if rw else asset_identity(paths["face_alignment"])
    lms, lm_key = cache.run("landmarks", {"reference": ref_key, "detector": det_id}, _landmarks, log)
    lm68 = lms["lm68"]

    # 3. 3DMM coefficients -------------------------------------------------------------------
    def _recon(_: Path) -> dict[str, np.ndarray]:
        from data.recon3d import FaceReconstructor

        rec = FaceReconstructor(
            weights=None if rw else paths["deep3d"],
            bfm_dir=bfm_dir,
            device=device,
            random_weights=rw,
            seed=int(cfg.seed),
        )
        coeff = rec.reconstruct(frames, lm68)
        return {"coeff": np.asarray(coeff, np.float32), "lm3d_std": np.asarray(rec.lm3d_std, np.float32)}

    rec, rec_key = cache.run(
        "recon",
        {
            "landmarks": lm_key,
            "model": f"random:{cfg.seed}" if rw else asset_identity(paths["deep3d"]),
            "bfm": bfm_id,
        },
        _recon,
        log,
    )
    coeff, lm3d_std = rec["coeff"], rec["lm3d_std"]

    random_hidden = _random_hubert_size(cfg) if rw else 0

    # 4. HuBERT ------------------------------------------------------------------------------
    def _hubert(_: Path) -> dict[str, np.ndarray]:
        from data.audio import HubertExtractor

        if rw:
            ext = HubertExtractor.random(hidden_size=random_hidden, seed=int(cfg.seed), device=device)
        else:
            ext = HubertExtractor(paths["hubert"], device=device, batch_size=int(cfg.hubert.batch_size))
        return {"hubert": ext(hubert_wave, name=str(inputs.audio))}

    hub, hub_key = cache.run(
        "hubert",
        {
            "audio": file_digest(inputs.audio),
            "samples": len(hubert_wave),
            "model": f"random:{random_hidden}:{cfg.seed}" if rw else asset_identity(paths["hubert"]),
        },
        _hubert,
        log,
    )
    hubert = hub["hubert"]

    # 5. AToM --------------------------------------------------------------------------------
    def _frontal_of_reference() -> tuple[np.ndarray, np.ndarray]:
        from data.face3d import Face3DHelper

        helper = Face3DHelper(bfm_dir)
        parts = helper.split_coeff(coeff)
        idexp = helper.reconstruct_idexp_lm3d(parts["identity"], parts["expression"]).cpu().numpy()
        key_mean = helper.key_mean_shape.cpu().numpy()
        return (idexp / 10.0 + key_mean).astype(np.float32), key_mean.astype(np.float32)

    def _atom(_: Path) -> dict[str, np.ndarray]:
        from AToM.inference import generate_landmarks, load_atom

        ref_lm3d_all, key_mean = _frontal_of_reference()
        diffusion = load_atom(
            None if rw else str(paths["atom"]),
            config=_plain(cfg.atom.config),
            ema=bool(cfg.atom.ema),
            device=device,
            random_weights=rw,
        )
        lm3d = generate_landmarks(
            diffusion,
            hubert,
            ref_lm3d_all[ref_frame],
            key_mean,
            steps=int(cfg.atom.steps),
            eta=float(cfg.atom.eta),
            guidance_weight=float(cfg.atom.guidance_weight),
            seed=int(cfg.atom.seed),
            progress=progress,
        )
        return {"frontal_lm3d": np.asarray(lm3d, np.float32)[:n_frames], "reference_lm3d": ref_lm3d_all}

    atom_out, atom_key = cache.run(
        "atom",
        {
            "hubert": hub_key,
            "recon": rec_key,
            "ref_frame": ref_frame,
            "model": "random" if rw else asset_identity(paths["atom"]),
            "config": _config_identity(cfg.atom.config),
            "ema": bool(cfg.atom.ema),
            "steps": int(cfg.atom.steps),
            "eta": float(cfg.atom.eta),
            "guidance_weight": float(cfg.atom.guidance_weight),
            "seed": int(cfg.atom.seed),
        },
        _atom,
        log,
    )
    frontal = atom_out["frontal_lm3d"]
    if len(frontal) < n_frames:
        raise RuntimeError(f"AToM returned {len(frontal)} frames for {n_frames} video frames")

    # 6. alignment onto the reference frames -------------------------------------------------
    from data.motion_align import pingpong_indices

    idx = pingpong_indices(n_ref, n_frames)  # reference played back and forth

    def _align(folder: Path) -> dict[str, np.ndarray]:
        from data.motion_align import align_landmarks, render_landmarks

        hw = (size, size)
        aligned = align_landmarks(frontal, lm68[idx], coeff[idx], lm3d_std, hw)
        # the masking landmarks are the reference frames' own projected 3DMM keypoints, the same
        # kind MToV was trained with (keypoints/non-face-centric/posed)
        posed_ref = align_landmarks(atom_out["reference_lm3d"], lm68, coeff, lm3d_std, hw)
        _write_pngs(folder / "landmarks_png", render_landmarks(aligned, hw, size=size))
        return {"aligned_lm68": np.asarray(aligned), "reference_posed_lm68": np.asarray(posed_ref)}

    al, al_key = cache.run(
        "align",
        {"atom": atom_key, "recon": rec_key, "landmarks": lm_key, "n_frames": n_frames, "size": size},
        _align,
        log,
    )

    # 7. MToV --------------------------------------------------------------------------------
    from data.imageops import mask_below_nose
    from data.motion_align import render_landmarks

    with StageTimer(timings, log=log)("render"):
        landmark_video = render_landmarks(al["aligned_lm68"], (size, size), size=size)  # [T,3,S,S]

    def _mtov(_: Path) -> dict[str, np.ndarray]:
        from MToV.generate import generate_video
        from MToV.loading import load_mtov

        masked = mask_below_nose(frames, al["reference_posed_lm68"])[idx]  # [T,S,S,3]
        models = load_mtov(
            None if rw else str(paths["autoencoder_rgb"]),
            None if rw else str(paths["autoencoder_motion"]),
            None if rw else str(paths["diffusion_model"]),
            config=_plain(cfg.mtov.config),
            device=device,
            random_weights=rw,
        )
        video = generate_video(
            models,
            landmark_video,
            np.ascontiguousarray(masked.transpose(0, 3, 1, 2)),
            np.ascontiguousarray(frames[ref_frame].transpose(2, 0, 1)),
            batch_size=int(cfg.mtov.batch_size),
            seed=int(cfg.mtov.seed),
            start_ratio=float(cfg.mtov.start_ratio),
            sampling_timesteps=int(cfg.mtov.sampling_timesteps),
            use_last_as_reference=bool(cfg.mtov.use_last_as_reference),
            precision=str(cfg.mtov.precision),
            progress=progress,
        )
        return {"frames": np.asarray(video, np.uint8)}

    mt, _mt_key = cache.run(
        "mtov",
        {
            "align": al_key,
            "reference": ref_key,
            "ref_frame": ref_frame,
            "models": "random"
            if rw
            else [
                asset_identity(paths[k]) for k in ("autoencoder_rgb", "autoencoder_motion", "diffusion_model")
            ],
            "config": _config_identity(cfg.mtov.config),
            "batch_size": int(cfg.mtov.batch_size),
            "start_ratio": float(cfg.mtov.start_ratio),
            "sampling_timesteps": int(cfg.mtov.sampling_timesteps),
            "use_last_as_reference": bool(cfg.mtov.use_last_as_reference),
            "precision": str(cfg.mtov.precision),
            "seed": int(cfg.mtov.seed),
        },
        _mtov,
        log,
    )
    video = mt["frames"]  # [T, 3, S, S]
    if video.shape[0] != n_frames:
        raise RuntimeError(f"MToV returned {video.shape[0]} frames for {n_frames} landmark frames")

    # 8. mp4 (+ preview) with the input audio --------------------------------------------------
    from data.video import write_video

    with StageTimer(timings, log=log)("write"):
        mux_rate = min(max(inputs.audio_rate, 8000), 48000)
        mux_audio = wave if mux_rate == SAMPLE_RATE else load_audio(inputs.audio, mux_rate)
        metadata = _metadata(cfg)
        hwc = video.transpose(0, 2, 3, 1)
        # the preview and the config first: the main output appears last, only when all is done
        if inputs.preview is not None:
            side = np.concatenate([landmark_video.transpose(0, 2, 3, 1), hwc], axis=2)
            write_video(
                inputs.preview, side, fps=FPS, audio=mux_audio, sample_rate=mux_rate, metadata=metadata
            )
        resolved = OmegaConf.merge(cfg, {"run": {"n_frames": n_frames, "audio_seconds": round(seconds, 4)}})
        save_config(resolved, inputs.config_path)
        write_video(
            inputs.out,
            hwc,
            fps=FPS,
            audio=mux_audio,
            sample_rate=mux_rate,
            metadata=metadata,
            crf=int(cfg.output.crf),
            preset=str(cfg.output.preset),
        )

    for name, rec_ in cache.records.items():
        timings[name] = rec_.seconds
    timings["total"] = time.perf_counter() - t_total
    _print_timings(cache, timings, n_frames, log)
    return PipelineResult(
        out=inputs.out,
        preview=inputs.preview,
        config_path=inputs.config_path,
        work_dir=inputs.work_dir,
        n_frames=n_frames,
        audio_seconds=seconds,
        stages=dict(cache.records),
        timings=timings,
    )


def _random_hubert_size(cfg: DictConfig) -> int:
    """Feature size of the random HuBERT: ``hubert.random_hidden_size``, or (null) the AToM
    config's ``model.cond_feature_dim`` so the two always agree (1024 for the official sizes)."""
    if cfg.hubert.random_hidden_size is not None:
        return int(cfg.hubert.random_hidden_size)
    atom_cfg = _plain(cfg.atom.config)
    if isinstance(atom_cfg, str):
        atom_cfg = OmegaConf.to_container(OmegaConf.load(atom_cfg), resolve=True)
    try:
        return int(atom_cfg["model"]["cond_feature_dim"])
    except (TypeError, KeyError):
        return 1024


def _plain(node: Any) -> Any:
    """A stage's ``config`` setting for its loader: a YAML path (relative paths are tried against the
    working folder, then the repository) or an inline mapping (plain dict); None = the loader's default."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, str):
        path = Path(node).expanduser()
        if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
            path = REPO / path
        if not path.is_file():
            raise UserError(f"stage config file not found: {node}")
        return str(path)
    return node


def _config_identity(node: Any) -> Any:
    """Cache-key part of a stage config: the file's digest for a path, else the value itself."""
    value = _plain(node)
    return file_digest(value) if isinstance(value, str) else value


def _metadata(cfg: DictConfig) -> dict[str, str]:
    note = "MoDiTalker reimplementation (AToM + MToV)"
    if cfg.random_weights:
        note += "; RANDOM WEIGHTS (--random_weights): not a real result, pipeline test only"
    return {
        "comment": note,
        "description": f"random_weights={bool(cfg.random_weights)}; seed={cfg.seed}; "
        f"atom.steps={cfg.atom.steps}; atom.guidance_weight={cfg.atom.guidance_weight}; "
        f"mtov.start_ratio={cfg.mtov.start_ratio}; mtov.sampling_timesteps={cfg.mtov.sampling_timesteps}",
    }


def _print_timings(
    cache: WorkCache, timings: dict[str, float], n_frames: int, log: Callable[[str], None]
) -> None:
    video_s = n_frames / FPS
    log(f"stage timings ({n_frames} frames = {video_s:.2f} s of video):")
    for name in ("reference", "landmarks", "recon", "hubert", "atom", "align", "render", "mtov", "write"):
        if name not in timings:
            continue
        rec = cache.records.get(name)
        how = " (reused)" if rec is not None and rec.cached else ""
        log(f"  {name:<10} {timings[name]:8.2f} s  {timings[name] / video_s:7.2f} s per s of video{how}")
    log(f"  {'total':<10} {timings['total']:8.2f} s")


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> PipelineResult:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    result = run_inference(cfg)
    print(f"video:   {result.out}")
    if result.preview is not None:
        print(f"preview: {result.preview}")
    print(f"config:  {result.config_path}")
    print(f"work:    {result.work_dir}")
    if cfg.random_weights:
        print("(random weights: see the warning above)", file=sys.stderr)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_main(main)
