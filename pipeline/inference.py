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

``python -m pipeline --audio A.wav --ref_video V.mp4 --out OUT.mp4 [key=value ...]`` (the command
line, :mod:`pipeline.cli`; also ``python -m pipeline.inference`` and ``scripts/inference.sh``). Every
setting, its default, type, range and flag is defined once in :mod:`pipeline.settings`. Bad inputs and
missing assets stop the run before any heavy work with one ``error:`` line and exit status 2; nothing
is written at the output path unless the run succeeds.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from moditalker.errors import UserError, cli_main
from pipeline import stages
from pipeline.events import StageEvents
from pipeline.models import ModelCache
from pipeline.resolve import resolve_args
from pipeline.settings import DEFAULTS
from pipeline.validate import REQUIRED_ASSETS, check_assets, validate

__all__ = ["DEFAULTS", "REQUIRED_ASSETS", "PipelineResult", "resolve_config", "run_inference", "main"]

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


#: the config of parsed command-line arguments (:func:`pipeline.resolve.resolve_args`)
resolve_config = resolve_args


# ----------------------------------------------------------------------------- the run
_log = functools.partial(print, flush=True)


def run_inference(
    cfg: DictConfig,
    *,
    log: Callable[[str], None] = _log,
    progress: bool = True,
    detector: Any = None,
    models: ModelCache | None = None,
    events: StageEvents | None = None,
) -> PipelineResult:
    """Run the whole pipeline for a resolved config (see :func:`resolve_config`).

    ``detector`` replaces FAN and s3fd inside :class:`data.landmarks.FaceLandmarkDetector` (a
    callable on uint8 frame batches returning per-frame ``[68, 2]`` landmarks or None), e.g. to
    test the no-face path; with ``random_weights`` the default is
    :func:`data.landmarks.template_face_detector` (random FAN/s3fd weights find no face).
    ``models`` keeps the networks between runs (:mod:`pipeline.models`); None: a fresh cache, so
    each network is loaded once for this run. ``events`` hears every stage start, end and progress
    (:mod:`pipeline.events`; the log's stage lines and the timing table are made from them too).
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
            cfg,
            inputs,
            assets,
            speech.n_frames,
            speech.seconds,
            log=log,
            progress=progress,
            models=models,
            events=events,
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
def main(argv: Sequence[str] | None = None) -> Any:
    """``python -m pipeline.inference``: :func:`pipeline.cli.main` (the command line's home)."""
    from pipeline.cli import main as cli

    return cli(argv, prog="python -m pipeline.inference")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_main(main)
