"""MToV sampling CLI: aligned landmarks + reference frames -> talking-head video.

``python -m MToV.sample --landmarks aligned.npy --ref_video ref.mp4 --out results/x`` (see
``--help``). The work is done by three modules, which this one only wires together:

* :mod:`MToV.loading`: the model settings, :func:`~MToV.loading.load_mtov` (networks + checkpoints);
* :mod:`MToV.conditions`: reading the landmarks and the reference, building the conditions;
* :mod:`MToV.generate`: :func:`~MToV.generate.generate_video` (the sampler; its module doc describes
  the original's inference path and what the fast path changes).

"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import field, make_dataclass
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from moditalker.assets import warn_random_weights
from moditalker.config import load_config, save_config
from moditalker.constants import FPS, SAMPLE_RATE
from moditalker.errors import UserError, cli_main, script_prog
from moditalker.fileio import repo_path
from MToV.calibration import resolve_plan
from MToV.conditions import build_conditions, condition_settings, read_landmark_input, read_reference
from MToV.generate import SETTING_TYPES as SAMPLER_SETTING_TYPES
from MToV.generate import SamplingOptions, check_sampling, generate_video
from MToV.loading import MODEL_DEFAULTS, PRECISIONS, load_mtov

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=script_prog("python -m MToV.sample"),
        description="MToV: aligned landmarks + reference video -> talking-head video (noised-start DDIM).",
        epilog="Any config value can also be given as key=value, e.g. sample.eta=0.5 train.lr=1e-4.",
    )
    p.add_argument(
        "--landmarks",
        required=True,
        help="aligned landmarks .npy [T,68,2] (reference-frame pixels) or a folder of rendered landmark PNGs",
    )
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref_video", help="reference video (upper face, background, pose come from it)")
    ref.add_argument("--ref_frames", help="folder of reference frames (PNG/JPEG, sorted by name)")
    p.add_argument(
        "--ref_landmarks",
        default=None,
        help="[T,68,2] .npy of the reference frames' own landmarks, "
        "used for masking below the nose (default: the aligned landmarks; required with PNG landmarks)",
    )
    p.add_argument("--identity_frame", type=int, default=0, help="reference frame used as identity [0]")
    p.add_argument("--out", required=True, help="output folder (video.mp4, frames/, config.yaml)")
    p.add_argument(
        "--config", default=None, help="YAML with model sizes/checkpoints (e.g. configs/mtov_tiny.yaml)"
    )
    p.add_argument(
        "--ae_rgb", default=None, help="RGB autoencoder checkpoint [checkpoints/autoencoder_rgb.pth]"
    )
    p.add_argument(
        "--ae_ldmk", default=None, help="landmark AE checkpoint [checkpoints/autoencoder_motion.pth]"
    )
    p.add_argument("--unet", default=None, help="UNet checkpoint [checkpoints/diffusion_model.pth]")
    p.add_argument(
        "--random_weights", action="store_true", help="no checkpoints: random networks (smoke test)"
    )
    p.add_argument("--batch_size", type=int, default=None, help="16-frame clips per batch [4]")
    p.add_argument(
        "--size", type=int, default=256, help="output frame size, 0 = the model's own resolution [256]"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed [0]")
    p.add_argument("--start_ratio", type=float, default=None, help="noised start at t = ratio*1000 [0.25]")
    p.add_argument("--steps", type=int, default=None, help="DDIM schedule length (ratio of it is run) [100]")
    p.add_argument(
        "--use_last_as_reference", action="store_true", help="carry the last frame as next reference"
    )
    p.add_argument("--audio", default=None, help="audio (or video) file muxed into video.mp4")
    p.add_argument(
        "--fps", type=float, default=float(FPS), help=f"frame rate of the reference and output [{FPS}]"
    )
    p.add_argument("--save_frames", action="store_true", help="also write frames/%%05d.png")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto = bf16 autocast of the autoencoders on GPUs; on the CPU what was measured >= 1.15x "
        "faster than fp32 on this machine (int8/bf16 autoencoders, int8 UNet), else fp32; "
        "bf16; int8 (CPU only: the autoencoders' linear layers and the UNet's convolutions); fp32 (exact)",
    )
    p.add_argument(
        "--calibration_file",
        default=None,
        help="JSON file keeping what --precision auto measured on this CPU [precision_calibration.json in "
        "$MODITALKER_CACHE_DIR, else $XDG_CACHE_HOME/moditalker, else ~/.cache/moditalker]",
    )
    p.add_argument("--recalibrate", action="store_true", help="--precision auto: time the precisions again")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


#: the types of an MToV config's ``sample`` section, for OmegaConf to check (the values live in
#: configs/mtov_diffusion.yaml: :data:`MToV.loading.MODEL_DEFAULTS`)
_SampleTypes = make_dataclass(
    "_SampleTypes", [(k, t, field(default=MISSING)) for k, t in SAMPLER_SETTING_TYPES.items()]
)


def _check_sample_config(cfg: DictConfig) -> None:
    """The ``sample`` section after overrides: known keys and their types (OmegaConf, by merging it
    into :class:`_SampleTypes`), ranges, a sampler that denoises."""
    if not OmegaConf.is_dict(cfg.get("sample")):
        raise UserError(f"sample must be a mapping of sampler settings, got {cfg.get('sample')!r}")
    try:
        sample = OmegaConf.to_container(cfg.sample, resolve=True)
    except Exception as exc:  # noqa: BLE001 - interpolation errors from the user's YAML
        raise UserError(f"bad sample settings: {exc}") from exc
    try:
        typed = OmegaConf.merge(OmegaConf.structured(_SampleTypes), sample)
    except ConfigKeyError as exc:
        known = ", ".join(MODEL_DEFAULTS["sample"])
        raise UserError(f"unknown sample setting {exc.full_key}; known: {known}") from None
    except ValidationError as exc:
        kind = {int: "an integer", float: "a number", bool: "true/false"}[SAMPLER_SETTING_TYPES[exc.full_key]]
        raise UserError(f"sample.{exc.full_key} must be {kind}, got {sample.get(exc.full_key)!r}") from None
    if not isinstance(sample["use_last_as_reference"], bool):  # OmegaConf would take 3 as true
        raise UserError(
            f"sample.use_last_as_reference must be true/false, got {sample['use_last_as_reference']!r}"
        )
    if typed.batch_size < 1:
        raise UserError(f"sample.batch_size (--batch_size) must be >= 1, got {typed.batch_size}")
    check_sampling(typed.start_ratio, typed.sampling_timesteps, typed.eta, int(cfg.diffusion.timesteps))


def main(argv: Sequence[str] | None = None) -> dict:
    from data.video import write_frame_folder, write_video
    from moditalker.fileio import check_output

    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(repo_path(args.config) if args.config else None, args.overrides, MODEL_DEFAULTS)
    for flag, key in (
        ("batch_size", "batch_size"),
        ("seed", "seed"),
        ("start_ratio", "start_ratio"),
        ("steps", "sampling_timesteps"),
    ):
        if getattr(args, flag) is not None:
            cfg.sample[key] = getattr(args, flag)
    if args.use_last_as_reference:
        cfg.sample.use_last_as_reference = True
    _check_sample_config(cfg)
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise UserError(f"--fps must be a positive number, got {args.fps}")
    if args.size != 0 and args.size < 16:
        raise UserError(f"--size must be 0 (the model's resolution) or at least 16, got {args.size}")
    out = Path(args.out)
    inputs = (
        args.landmarks,
        args.ref_video,
        args.ref_landmarks,
        args.audio,
        args.ae_rgb,
        args.ae_ldmk,
        args.unet,
    )
    video_path = check_output(out / "video.mp4", args.overwrite, inputs)
    if args.save_frames and (out / "frames").exists() and not args.overwrite:  # before the sampling
        raise UserError(f"{out / 'frames'} already exists; pass --overwrite to replace it")
    audio = None
    if args.audio:  # read first: a bad file fails now, not after the sampling
        from data.audio import load_audio

        audio = load_audio(args.audio, SAMPLE_RATE)

    ref = read_reference(args.ref_video, args.ref_frames, fps=args.fps)  # [N, H, W, 3]
    models = load_mtov(args.ae_rgb, args.ae_ldmk, args.unet, cfg, args.device, args.random_weights)
    # output size: --size (256 by default, as the pipeline); a model of another resolution (the tiny
    # config's 32) runs at its own size inside generate_video, which resizes in and out. The landmark
    # dots are drawn at the model's size with the radius it was trained with, as its trainers draw them
    size = int(args.size) if args.size else models.resolution
    model_size, radius = condition_settings(models)
    lm_video, lm = read_landmark_input(
        args.landmarks, ref.shape[1:3], size, model_size=model_size, radius=radius
    )
    conditions = build_conditions(
        ref,
        lm_video,
        size,
        landmarks=lm,
        ref_landmarks=args.ref_landmarks or None,
        identity_frame=args.identity_frame,
    )
    if args.random_weights:  # after the input checks: a refused run prints its one error line only
        warn_random_weights("the MToV autoencoders and UNet are", "The video is NOT a talking head.")
    n = lm_video.shape[0]
    choice = resolve_plan(
        args.precision,
        models,
        models.device,
        cache_file=args.calibration_file,
        recalibrate=args.recalibrate,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    t0 = time.perf_counter()
    options = SamplingOptions.from_config(cfg.sample, precision=choice.plan)
    video = generate_video(models, *conditions, options, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    if audio is not None:
        audio = audio[: int(round(n / args.fps * SAMPLE_RATE))]
    hwc = video.transpose(0, 2, 3, 1)
    write_video(video_path, hwc, fps=args.fps, audio=audio, sample_rate=SAMPLE_RATE)
    if args.save_frames:
        write_frame_folder(out / "frames", hwc, overwrite=args.overwrite)
    save_config(cfg, out / "config.yaml")
    result = {"video": str(video_path), "frames": n, "seconds": round(seconds, 3)}
    result["precision_used"] = choice.plan.per_network()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli_main(main)
