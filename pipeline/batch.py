"""Several videos with the networks loaded once: ``scripts/inference.sh --batch_file jobs.txt``.

A job file has one job per line, written as the arguments of one ``scripts/inference.sh`` run
(shell quoting; blank lines and ``#`` comments are skipped)::

    # jobs.txt
    --audio talks/a.wav --ref_video faces/anna.mp4 --out out/a.mp4
    --audio talks/b.wav --ref_image faces/ben.png  --out out/b.mp4 --seed 3 mtov.batch_size=8

The flags given on the command line next to ``--batch_file`` apply to every job (e.g. ``--config``,
``--device``, ``--random_weights``, ``--preview``); a job's own flags win over them. Paths are relative
to the current folder, as on the command line.

Every job is checked before any of them runs (the same checks as a single run: inputs, settings,
output paths), and no two jobs may write the same file or read another job's output; a bad line stops
the batch with its line number and nothing is run. Then the jobs run one after another with one
:class:`~pipeline.models.ModelCache`, so each network is built once for the whole batch (a job with
other checkpoints or another config loads those once more). A job that fails on its input while
running (no face found, say) is reported and the batch goes on; the command then ends with one
``error:`` line naming the failed lines (exit status 2).

At the end a table gives per job: seconds of video, the seconds the job spent loading networks (only
the first job, normally), its other seconds, and those per second of video.
:func:`run_batch` is the Python API: resolved configs in, :class:`BatchResult` out.

Resumable: a job whose video exists and was made with the same settings (the ``OUT.yaml`` beside it;
the video is renamed into place last) is skipped as already rendered; a video made with other
settings is refused as before unless ``--overwrite``. A killed job resumes from its stage cache.

Several processes (:mod:`moditalker.bulk`): ``NUM_PROCESSES=N scripts/inference.sh --batch_file ...``
(and ``NUM_MACHINES``, ...) or independent jobs ``--shard K --num_shards N``. Every rank checks every
line, then renders its share (every world-th job in line order) on its own device (``cuda:LOCAL_RANK``
for ``--device auto``) with its own warm networks; its log lines start with ``[rank R/W]``. Rank 0
gathers the failed jobs of every rank and ends with the one ``error:`` line. The videos are the same
whichever rank renders them.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from moditalker.constants import FPS
from moditalker.errors import UserError
from moditalker.fileio import same_file
from pipeline.events import STAGES, StageTimes
from pipeline.inference import run_inference
from pipeline.models import ModelCache
from pipeline.resolve import resolve_args
from pipeline.validate import REQUIRED_ASSETS, asset_paths, check_assets, validate

__all__ = ["BatchJob", "BatchResult", "JobReport", "read_jobs", "resolve_jobs", "run_batch", "format_report"]

_log = functools.partial(print, flush=True)


@dataclass
class BatchJob:
    """One line of a job file: where it came from and its arguments."""

    line: int
    argv: list[str]
    cfg: DictConfig | None = None
    done: bool = False  # its video exists, made with the same settings (resume)


@dataclass
class JobReport:
    """What one job did: its output, or the one-line error that stopped it, and its seconds."""

    line: int
    out: Path | None
    error: str | None = None
    video_seconds: float = 0.0
    load_seconds: float = 0.0  # building networks during this job
    total_seconds: float = 0.0
    work_dir: Path | None = None
    stages: dict[str, bool] = field(default_factory=dict)  # stage -> reused (from the stage events)

    @property
    def work_seconds(self) -> float:
        return self.total_seconds - self.load_seconds


@dataclass
class BatchResult:
    jobs: list[JobReport] = field(default_factory=list)
    models: ModelCache | None = None

    @property
    def failed(self) -> list[JobReport]:
        return [j for j in self.jobs if j.error is not None]


def read_jobs(path: str | Path) -> list[BatchJob]:
    """The jobs of a job file (see the module docstring), with their line numbers."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--batch_file {p}: " + ("is a folder" if p.is_dir() else "does not exist"))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--batch_file {p}: cannot read it as text ({exc.__class__.__name__})") from exc
    jobs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            argv = shlex.split(raw, comments=True)
        except ValueError as exc:  # an open quote
            raise UserError(f"{p} line {number}: {exc}") from exc
        if argv:
            jobs.append(BatchJob(number, argv))
    if not jobs:
        raise UserError(f"--batch_file {p} has no job (one line of scripts/inference.sh arguments each)")
    return jobs


def resolve_jobs(
    jobs: Sequence[BatchJob],
    common: Sequence[str],
    parse: Callable[[list[str]], argparse.Namespace],
    source: str = "--batch_file",
) -> list[BatchJob]:
    """Each job's config (``common`` flags, then the line's, parsed by ``parse``: the command line's
    parser), checked as a single run is, and the jobs checked against each other: no shared output
    file, no job reading another's output. A job whose video already exists with the same settings is
    marked ``done`` (see :func:`already_rendered`)."""
    seen: dict[str, tuple[int, Path]] = {}
    for job in jobs:
        where = f"{source}: line {job.line}"
        try:
            args = parse([*common, *job.argv])
            if getattr(args, "batch_file", None) is not None:
                raise UserError("--batch_file cannot be given inside a job file")
            if getattr(args, "shard", None) is not None or getattr(args, "num_shards", None) is not None:
                raise UserError("--shard and --num_shards split the whole batch: give them with --batch_file")
            job.cfg = resolve_args(args)
            job.done = already_rendered(job.cfg)
            if job.done:
                outs = _outputs(job.cfg)
            else:
                inputs = validate(job.cfg)
                check_assets(job.cfg)
                outs = [p for p in (inputs.out, inputs.preview, inputs.config_path) if p is not None]
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from exc
        for name, (other, other_out) in seen.items():
            for path in outs:
                if str(path.resolve()) == name or same_file(path, other_out):
                    raise UserError(f"{where}: writes {path}, which line {other} also writes")
        for path in outs:
            seen[str(path.resolve())] = (job.line, path)
    outputs = {name: line for name, (line, _) in seen.items()}
    for job in jobs:
        for key in ("audio", "ref_video", "ref_image"):
            value = job.cfg.get(key)
            if value and str(Path(value).resolve()) in outputs:
                line = outputs[str(Path(value).resolve())]
                raise UserError(f"{source}: line {job.line}: reads {value}, which line {line} writes")
    return list(jobs)


#: settings that do not change the video (left out when a finished job's settings are compared)
_NOT_COMPARED = ("overwrite", "device", "work_dir", "clean_work", "run")


def _outputs(cfg: DictConfig) -> list[Path]:
    out = Path(cfg.out)
    preview = out.with_name(out.stem + "_preview" + out.suffix) if cfg.preview else None
    return [p for p in (out, preview, out.with_suffix(".yaml")) if p is not None]


def already_rendered(cfg: DictConfig) -> bool:
    """Whether the job of ``cfg`` is finished: not ``overwrite``, its video (renamed into place last),
    preview and ``OUT.yaml`` exist, and the YAML records the same settings (device and work folder
    aside)."""
    from omegaconf import OmegaConf

    if cfg.overwrite or not cfg.out or not all(p.is_file() for p in _outputs(cfg)):
        return False
    try:
        saved = OmegaConf.to_container(OmegaConf.load(Path(cfg.out).with_suffix(".yaml")), resolve=True)
    except Exception:  # an unreadable YAML: not ours, validate() refuses to overwrite it
        return False
    if not isinstance(saved, dict):
        return False
    want = OmegaConf.to_container(cfg, resolve=True)
    strip = lambda d: {k: v for k, v in d.items() if k not in _NOT_COMPARED}  # noqa: E731
    return strip(saved) == strip(want) and not _inputs_changed_since(cfg, Path(cfg.out).stat().st_mtime)


def _inputs_changed_since(cfg: DictConfig, when: float) -> bool:
    """Whether an input file of the job (the audio, the reference, a checkpoint or a file of a checkpoint
    folder) was written after ``when`` (the video's time): the same paths with new contents are a new
    job, as for ``make``."""
    paths = [Path(p) for p in (cfg.audio, cfg.ref_video, cfg.ref_image) if p]
    if not cfg.get("random_weights", False):
        assets = asset_paths(cfg)
        paths += [assets[k] for k in REQUIRED_ASSETS]
    for path in paths:
        files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path]
        if any(f.is_file() and f.stat().st_mtime > when for f in files):
            return True
    return False


def run_batch(
    configs: Sequence[DictConfig],
    *,
    lines: Sequence[int] | None = None,
    models: ModelCache | None = None,
    log: Callable[[str], None] = _log,
    progress: bool = True,
) -> BatchResult:
    """Run :func:`pipeline.inference.run_inference` for each resolved config with one model cache;
    a :class:`UserError` in one job is recorded and the next job runs."""
    models = models if models is not None else ModelCache()
    lines = list(lines) if lines is not None else list(range(1, len(configs) + 1))
    result = BatchResult(models=models)
    for number, (line, cfg) in enumerate(zip(lines, configs, strict=True), start=1):
        log(f"=== job {number} of {len(configs)} (line {line}): {cfg.out}")
        loaded_before = sum(models.seconds.values())
        t0 = time.perf_counter()
        report, times = JobReport(line, Path(cfg.out)), StageTimes()
        try:
            out = run_inference(cfg, log=log, progress=progress, models=models, events=times)
            report.video_seconds, report.work_dir = out.n_frames / FPS, out.work_dir
        except UserError as exc:
            report.error = str(exc)
            log(f"error (line {line}): {exc}")
        report.stages = {s: times.cached[s] for s in STAGES if s in times.cached}
        report.total_seconds = time.perf_counter() - t0
        report.load_seconds = sum(models.seconds.values()) - loaded_before
        result.jobs.append(report)
    return result


def format_report(result: BatchResult) -> str:
    """The per-job table (seconds of video, loading, the rest and the rest per second of video, the
    stages reused from the stage cache of those that finished)."""
    rows = [
        f"{'line':>5}  {'video s':>8}  {'load s':>7}  {'work s':>8}  {'s per s':>8}  {'reused':>6}  output"
    ]
    for j in result.jobs:
        reused = f"{sum(j.stages.values())}/{len(j.stages)}"
        if j.error is not None:
            rows.append(f"{j.line:>5}  {'-':>8}  {j.load_seconds:>7.1f}  {j.work_seconds:>8.1f}  {'-':>8}  "
                        f"{reused:>6}  FAILED: {j.error}")  # fmt: skip
            continue
        per = j.work_seconds / j.video_seconds if j.video_seconds else float("nan")
        rows.append(
            f"{j.line:>5}  {j.video_seconds:>8.2f}  {j.load_seconds:>7.1f}  {j.work_seconds:>8.1f}  "
            f"{per:>8.2f}  {reused:>6}  {j.out}"
        )
    if result.models is not None:
        loads = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(result.models.seconds.items()))
        built = sum(result.models.loads.values())
        rows.append(f"networks built: {built} ({loads}); reused {sum(result.models.hits.values())} times")
    return "\n".join(rows)
