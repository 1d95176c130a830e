"""The command line of the pipeline: ``python -m pipeline`` (also ``python -m pipeline.inference`` and
``scripts/inference.sh``). One video (:func:`pipeline.inference.run_inference`), or with
``--batch_file`` several with the networks loaded once (:mod:`pipeline.batch`), this process's share of
them when several processes render (:mod:`moditalker.bulk`)."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from moditalker import bulk
from moditalker.errors import ArgumentParser, UserError, cli_main, script_prog
from pipeline.batch import BatchJob, BatchResult, format_report, read_jobs, resolve_jobs, run_batch
from pipeline.inference import PipelineResult, run_inference
from pipeline.resolve import resolve_args
from pipeline.settings import flag_settings

__all__ = ["build_parser", "main", "main_batch"]

_log = functools.partial(print, flush=True)


def build_parser(prog: str = "python -m pipeline") -> argparse.ArgumentParser:
    """One flag per setting that has one in :mod:`pipeline.settings` (type, help and default from
    there), plus ``--config`` and the ``key=value`` overrides."""
    p = ArgumentParser(
        prog=script_prog(prog),
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


def main(
    argv: Sequence[str] | None = None, *, prog: str = "python -m pipeline"
) -> PipelineResult | BatchResult:
    """One video, or the jobs of ``--batch_file`` (this rank's share); ``prog``: the usage line's command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.batch_file is not None:
        args.shard = 0 if args.shard is None else args.shard
        args.num_shards = 1 if args.num_shards is None else args.num_shards
        return main_batch(args, argv, parser)
    if args.shard is not None or args.num_shards is not None:
        raise UserError("--shard and --num_shards split the jobs of a --batch_file; give one too")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError(
            "several processes render only with --batch_file (each takes its share of the jobs); "
            "run one video without NUM_PROCESSES"
        )
    cfg = resolve_args(args)
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


def main_batch(
    args: argparse.Namespace, argv: Sequence[str], parser: argparse.ArgumentParser | None = None
) -> BatchResult:
    """``--batch_file``: the command line's other arguments are common to every job; this rank
    renders its share of the jobs (see the module docstring)."""
    common = _without_batch_flags(argv)
    parser = parser or build_parser()
    jobs = resolve_jobs(
        read_jobs(args.batch_file), common, parser.parse_intermixed_args, str(args.batch_file)
    )
    ranks = bulk.start(args.shard, args.num_shards)
    try:
        return _run_share(args, jobs, ranks)
    finally:
        ranks.close()


def _run_share(args: argparse.Namespace, jobs: list[BatchJob], ranks: bulk.Ranks) -> BatchResult:
    log = functools.partial(ranks.log) if ranks.world > 1 else _log
    mine = ranks.share(jobs, key=lambda j: j.line)
    todo = [j for j in mine if not j.done]
    for job in todo:
        job.cfg.device = ranks.device(job.cfg.device)
        job.cfg.work_dir = ranks.own_folder(job.cfg.work_dir)
    finished = [j.line for j in mine if j.done]
    if ranks.world > 1:
        lines = ", ".join(str(j.line) for j in mine) or "none"
        log(f"batch: {len(jobs)} jobs from {args.batch_file}; this rank renders lines {lines}")
    else:
        log(f"batch: {len(jobs)} jobs from {args.batch_file}, each network loaded once")
    if finished:
        log(f"already rendered with the same settings, skipped: line(s) {', '.join(map(str, finished))}")
    result = run_batch([j.cfg for j in todo], lines=[j.line for j in todo], progress=True, log=log)
    log("batch timings (load s: building networks during the job; work s: the rest):")
    for row in format_report(result).splitlines():
        log(row)
    for job, report in zip(todo, result.jobs, strict=True):
        if report.error is None and job.cfg.clean_work and report.work_dir is not None:
            shutil.rmtree(report.work_dir, ignore_errors=True)
    if ranks.is_main and any(j.cfg.random_weights for j in jobs):
        print("(random weights: see the warning above)", file=sys.stderr)
    ranks.finish(
        {f"line {j.line}": j.error for j in result.failed},
        total=len(jobs),
        what="jobs",
        message=lambda names: (
            f"{len(names)} of {len(jobs)} jobs failed (lines "
            f"{', '.join(n.removeprefix('line ') for n in names)}); see above"
        ),
    )
    return result


def _without_batch_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--batch_file``, ``--shard`` and ``--num_shards`` (flags of the batch, not of
    its jobs)."""
    out, skip = [], False
    names = ("--batch_file", "--shard", "--num_shards")
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if a.startswith(tuple(f"{n}=" for n in names)):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_main(main)
