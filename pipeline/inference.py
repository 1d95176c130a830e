"""End to end: speech audio + reference video (or photo) -> talking-head mp4 with the audio muxed in.

Stages (each cached in the work folder under a hash of its inputs and settings, see
:mod:`pipeline.cache`; one module each in :mod:`pipeline.stages`):

1. ``reference``  reference video -> 25 fps -> centre crop 256x256 (or one photo), stored memory-mapped;
2. ``landmarks``  FAN 68-point 2D landmarks of the reference frames;
3. ``recon``      Deep3DFaceRecon 257 3DMM coefficients of the reference frames;
4. ``hubert``     audio -> 16 kHz -> HuBERT features (50 Hz);
5. ``atom``       AToM -> frontal 3D landmarks for the whole audio (2 HuBERT frames per video frame);
6. ``align``      frontal landmarks re-posed onto the reference frames (played back and forth when
                  the audio is longer than the video) -> pixel landmarks, rendered dot video (PNGs);
7. ``mtov``       MToV -> 256x256 frames, in batches of 16-frame clips, each batch cached as it is
                  finished (a killed run resumes there) and encoded straight into
8. the H.264 mp4 (25 fps) with the input audio as AAC and an optional side-by-side preview
   (landmarks | generated), renamed into place when complete, and the resolved config next to it.
Memory does not grow with the length of the audio beyond the audio itself and per-frame landmarks;
``--start`` / ``--duration`` render a part of it.

``python -m pipeline.inference --audio A.wav --ref_video V.mp4 --out OUT.mp4 [key=value ...]``
(also ``scripts/inference.sh``). Every setting, its default, type, range and flag is defined once in
:mod:`pipeline.settings`. Bad inputs and missing assets stop the run before any heavy work with one
``error:`` line and exit status 2; nothing is written at the output path unless the run succeeds.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moditalker.config import load_config
from moditalker.errors import ArgumentParser, UserError, cli_main, script_prog
from moditalker.fileio import REPO_ROOT
from pipeline import stages
from pipeline.batch import BatchResult, main_batch
from pipeline.models import ModelCache
from pipeline.settings import DEFAULTS, FLAGS, flag_settings, inherit_settings
from pipeline.validate import REQUIRED_ASSETS, check_assets, validate

__all__ = [
    "DEFAULTS",
    "REQUIRED_ASSETS",
    "PipelineResult",
    "build_parser",
    "resolve_config",
    "run_inference",
    "main",
]

RANDOM_WARNING = """\
################################################################################
#  WARNING: --random_weights: every network (HuBERT, FAN, Deep3DFaceRecon,    #
#  AToM, MToV) is RANDOMLY INITIALISED, except the AToM / MToV checkpoints    #
#  named with assets.*=..., and the BFM is SYNTHETIC. The video this produces #
#  is NOT a talking head; it only exercises the pipeline. Put the real        #
#  checkpoints in checkpoints/ for real results (see                          #
#  `python -m moditalker.assets check`).                                      #
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
    """One flag per setting that has one in :mod:`pipeline.settings` (type, help and default from
    there), plus ``--config`` and the ``key=value`` overrides."""
    p = ArgumentParser(
        prog=script_prog("python -m pipeline.inference"),
        description="Audio + reference video (or photo) -> talking-head mp4 (AToM + alignment + MToV).",
        epilog="Any setting can also be given as key=value (e.g. atom.steps=25 mtov.batch_size=8).",
    )
    groups: dict[str, Any] = {}
    for s in flag_settings():
        target = p
        if s.exclusive is not None:
            if s.exclusive not in groups:
                groups[s.exclusive] = p.add_mutually_exclusive_group()
            target = groups[s.exclusive]
        help_ = s.help if s.key == s.flag else f"{s.help} ({s.key})"
        if s.type is bool:  # a switch; None (not given) leaves the config's value
            target.add_argument(f"--{s.flag}", action="store_true", default=None, help=help_)
            continue
        if s.default is not None:
            help_ += f" [{s.default:g}]" if isinstance(s.default, float) else f" [{s.default}]"
        kind = s.type if s.type in (int, float) else None
        target.add_argument(f"--{s.flag}", type=kind, default=None, help=help_)
    p.add_argument("--config", default=None, help="YAML config (default: configs/inference.yaml)")
    p.add_argument(
        "--batch_file",
        default=None,
        help="render several videos with the networks loaded once: one job per line, written as this "
        "command's arguments (e.g. --audio A.wav --ref_video V.mp4 --out A.mp4); the flags given here "
        "apply to every job (see pipeline/batch.py)",
    )
    p.add_argument(
        "--shard",
        type=int,
        default=None,
        help="with --batch_file: this independent job's share of the jobs (0-based; see --num_shards)",
    )
    p.add_argument(
        "--num_shards",
        type=int,
        default=None,
        help="with --batch_file: independent jobs (no rendezvous, e.g. a Slurm array) sharing the jobs [1]",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def resolve_config(args: argparse.Namespace) -> DictConfig:
    """defaults <- YAML (--config, else configs/inference.yaml) <- flags <- key=value overrides."""
    from omegaconf.errors import OmegaConfBaseException

    path = args.config if args.config is not None else REPO_ROOT / "configs" / "inference.yaml"
    if args.config is None and not Path(path).is_file():
        path = None
    cfg = load_config(path, (), defaults=DEFAULTS)
    for name, key in FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        try:  # set as is: a path such as "it's a.wav" or "123" is not re-parsed as YAML
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as exc:
            raise UserError(f"cannot set {key} from --{name}: {str(exc).splitlines()[0]}") from exc
    cfg = load_config(None, list(args.overrides), defaults=cfg)
    inherit_settings(cfg)  # null atom.seed / mtov.seed: the top-level seed
    return cfg


# ----------------------------------------------------------------------------- the run
_log = functools.partial(print, flush=True)


def run_inference(
    cfg: DictConfig,
    *,
    log: Callable[[str], None] = _log,
    progress: bool = True,
    detector: Any = None,
    models: ModelCache | None = None,
) -> PipelineResult:
    """Run the whole pipeline for a resolved config (see :func:`resolve_config`).

    ``detector`` replaces FAN and s3fd inside :class:`data.landmarks.FaceLandmarkDetector` (a
    callable on uint8 frame batches returning per-frame ``[68, 2]`` landmarks or None), e.g. to
    test the no-face path; with ``random_weights`` the default is
    :func:`data.landmarks.template_face_detector` (random FAN/s3fd weights find no face).
    ``models`` keeps the networks between runs (:mod:`pipeline.models`); None: a fresh cache, so
    each network is loaded once for this run.
    """
    t_total = time.perf_counter()
    # 0. the cheap checks, then the audio (too short / silent stops here, before the work folder)
    inputs = validate(cfg)
    assets = check_assets(cfg)
    speech = stages.hubert.load_speech(cfg, inputs)
    if cfg.random_weights:
        print(RANDOM_WARNING, file=sys.stderr, flush=True)
    # folders this run creates (the work folder and any missing parents): removed again when the
    # run is refused for a bad input later on, so a refused run leaves the file system as it was
    created = [p for p in (inputs.work_dir, *inputs.work_dir.parents) if not p.exists()]
    try:
        ctx = stages.open_context(
            cfg, inputs, assets, speech.n_frames, speech.seconds, log=log, progress=progress, models=models
        )
        ref = stages.reference.run(ctx)  # 1. reference frames
        lms = stages.landmarks.run(ctx, ref, detector)  # 2. FAN landmarks
        rec = stages.recon.run(ctx, ref, lms)  # 3. 3DMM coefficients
        hub = stages.hubert.run(ctx, speech)  # 4. HuBERT features
        atom = stages.atom.run(ctx, hub, rec)  # 5. AToM frontal landmarks
        if models is None:  # this run's own cache: HuBERT, FAN, 3DMM and AToM are not needed again,
            ctx.models.clear()  # so MToV does not run with them in memory (HuBERT-large alone is 1.3 GB)
        aligned = stages.align.run(ctx, ref, lms, rec, atom)  # 6. alignment onto the reference frames
        with stages.output.open_video(ctx, speech) as sink:  # 8. mp4 (+ preview) and OUT.yaml, when done
            stages.mtov.run(ctx, ref, aligned, sink)  # 7. MToV frames, batch by batch into the mp4
    except UserError:
        if created and created[-1].exists():
            shutil.rmtree(created[-1], ignore_errors=True)
        raise

    timings = stages.output.report_timings(ctx, t_total)
    return PipelineResult(
        out=inputs.out,
        preview=inputs.preview,
        config_path=inputs.config_path,
        work_dir=inputs.work_dir,
        n_frames=ctx.n_frames,
        audio_seconds=speech.seconds,
        stages=dict(ctx.cache.records),
        timings=timings,
    )


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> PipelineResult | BatchResult:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.batch_file is not None:
        args.shard = 0 if args.shard is None else args.shard
        args.num_shards = 1 if args.num_shards is None else args.num_shards
        return main_batch(args, argv)
    if args.shard is not None or args.num_shards is not None:
        raise UserError("--shard and --num_shards split the jobs of a --batch_file; give one too")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError(
            "several processes render only with --batch_file (each takes its share of the jobs); "
            "run one video without NUM_PROCESSES"
        )
    cfg = resolve_config(args)
    result = run_inference(cfg)
    print(f"video:   {result.out}")
    if result.preview is not None:
        print(f"preview: {result.preview}")
    print(f"config:  {result.config_path}")
    if cfg.clean_work:
        shutil.rmtree(result.work_dir, ignore_errors=True)
        print(f"work:    {result.work_dir} (removed: --clean_work)")
    else:
        size = sum(f.stat().st_size for f in result.work_dir.rglob("*") if f.is_file())
        print(f"work:    {result.work_dir} ({size / 2**20:.1f} MB stage cache; --clean_work removes it)")
    if cfg.random_weights:
        print("(random weights: see the warning above)", file=sys.stderr)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_main(main)
