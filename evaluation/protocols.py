"""Protocols that generate the videos they score, through the end-to-end pipeline.

``python -m evaluation --protocol hdtf_selfrecon --data DIR --split_file FILE --out OUT``
    every test id listed in FILE is generated from its own audio and its own frames (``--audio`` and
    ``--ref_video`` both the real video, the paper's self-reconstruction) and scored against the real
    video with every metric (:mod:`evaluation.evaluate`).

``python -m evaluation --protocol cross_identity --data DIR --pairs FILE|auto --out OUT``
    the audio of one id drives the reference video of another (``audio_id ref_id`` per line, or
    ``auto``: each test id of ``--split_file`` with the next one's reference, cyclic); there is no
    real counterpart, so only the no-reference metrics are reported (LSE-C/D of the generated video
    with its driving audio, CPBD, CSIM against the reference identity's first face frame), with the
    real reference clips' own row.

Each job writes ``OUT/audio/NAME.wav`` (the driving audio, cut to the clip), ``OUT/real/NAME.mp4``
(the real reference frames in the pipeline's 25 fps 256x256 centre-crop form, with their own audio;
see :mod:`evaluation.clips`), ``OUT/generated/NAME.mp4`` (+ the pipeline's ``NAME.yaml``) and
``OUT/logs/NAME.log``; NAME is the id, or ``AUDIO--REF``. ``OUT/protocol.json`` records the settings
the videos were made with and which are done: a rerun skips the finished ones (resume), refuses other
settings unless ``--overwrite`` (which regenerates everything), and writes the report to
``--json`` (default ``OUT/report.json``, the table beside it as ``.txt``). A video that cannot be made
is reported and the others go on; the command then ends with one ``error:`` line naming every failed
video (exit 2) and writes no report.

Several processes (:mod:`moditalker.bulk`; ``NUM_PROCESSES=N scripts/evaluate.sh --protocol ...``):
each rank generates its share of the videos (every world-th of the jobs sorted by name) on its own
device with its own warm networks (one :class:`~pipeline.models.ModelCache` per rank), then scores its
share; rank 0 gathers the failures and the metric records and writes the report, the one a single
process writes. Ranks record finished videos in ``protocol.json`` under a file lock.
``--shard K --num_shards N``: independent jobs each generate their share and stop; the same command
without them then reuses every finished video and scores them all.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from evaluation import clips
from evaluation.protocol import FPS, VideoPair, check_lengths, count_frames
from evaluation.scoring import format_table, score_args, write_report
from evaluation.splits import HDTF_TEST_SPLIT, auto_pairs, read_ids, read_pairs
from moditalker import bulk, fileio
from moditalker.errors import UserError
from moditalker.fileio import atomic_write_text, check_output, repo_path, same_file
from pipeline.inference import run_inference
from pipeline.models import ModelCache
from pipeline.resolve import resolve
from pipeline.settings import check_settings
from pipeline.validate import check_assets

__all__ = ["NO_REFERENCE", "Job", "read_ids", "read_pairs", "auto_pairs", "make_jobs", "run"]

#: the metrics that need no real counterpart of the generated video (cross_identity reports these)
NO_REFERENCE = ("lse", "csim", "cpbd")
MANIFEST = "protocol.json"
#: pipeline settings that differ per job or do not change the video (left out of the manifest)
PER_JOB = ("audio", "ref_video", "ref_image", "out", "work_dir", "overwrite", "device", "preview")


@dataclass(frozen=True)
class Job:
    """One generated video: the audio of ``audio_id`` driving the reference video of ``ref_id``."""

    name: str
    audio_id: str
    ref_id: str
    audio: Path  # the source video whose audio track drives
    ref: Path  # the source video giving the reference frames (and the real clip)


def _check_known(ids: list[str], known, what: str, where: str) -> None:
    absent = [i for i in dict.fromkeys(ids) if i not in known]
    if absent:
        shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
        raise UserError(f"{len(absent)} id(s) of {what} have no {where}: {shown}")


def _available(split: list[str], videos, data) -> list[str]:
    """The shipped HDTF test ids that have a video in ``--data``: HDTF's videos leave the host over
    time, so a downloaded copy lacks some; they are named on stderr and the others evaluated."""
    present = [i for i in split if i in videos]
    absent = [i for i in split if i not in videos]
    if absent and present:
        import sys

        shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
        print(
            f"warning: {len(absent)} of the {len(split)} HDTF test ids have no video in --data {data} "
            f"(unavailable when downloaded?): {shown}; evaluating the other {len(present)}",
            file=sys.stderr,
        )
    return present if present else split


def make_jobs(args: argparse.Namespace, videos: dict[str, Path]) -> list[Job]:
    """The jobs of ``args.protocol`` (after ``--max_videos``); every id named must have a video."""
    split = read_ids(args.split_file) if args.split_file else None
    if split is not None and same_file(args.split_file, HDTF_TEST_SPLIT):
        split = _available(split, videos, args.data)
    if args.protocol == "hdtf_selfrecon":
        _check_known(split, videos, f"split file {args.split_file}", f"video in --data {args.data}")
        jobs = [Job(i, i, i, videos[i], videos[i]) for i in split]
    else:
        if args.pairs == "auto":
            pairs = auto_pairs(split)
            _check_known(split, videos, f"split file {args.split_file}", f"video in --data {args.data}")
        else:
            pairs = read_pairs(args.pairs)
            named = [i for p in pairs for i in p]
            if split is not None:
                _check_known(
                    named, split, f"pairs file {args.pairs}", f"line in --split_file {args.split_file}"
                )
            _check_known(named, videos, f"pairs file {args.pairs}", f"video in --data {args.data}")
        jobs = [Job(f"{a}--{r}", a, r, videos[a], videos[r]) for a, r in pairs]
    return jobs[: args.max_videos]


# ----------------------------------------------------------------------------- checks and settings
def _check_flags(args: argparse.Namespace) -> None:
    name = args.protocol
    if args.pred is not None or args.gt is not None:
        raise UserError(f"--protocol {name} generates the videos itself; drop --pred/--gt")
    if args.data is None or args.out is None:
        raise UserError(f"--protocol {name} needs --data (the videos) and --out (a folder for the results)")
    if name == "hdtf_selfrecon":
        if args.pairs is not None:
            raise UserError("--pairs goes with --protocol cross_identity, not hdtf_selfrecon")
        if args.split_file is None:  # the shipped HDTF test split of the original (98 ids)
            args.split_file = str(HDTF_TEST_SPLIT)
    else:
        if args.pairs is None:
            raise UserError(
                "--protocol cross_identity needs --pairs FILE ('audio_id ref_id' lines) or --pairs auto"
            )
        if args.pairs == "auto" and args.split_file is None:
            args.split_file = str(HDTF_TEST_SPLIT)
    if args.max_videos is not None and args.max_videos < 1:
        raise UserError(f"--max_videos must be at least 1, got {args.max_videos}")
    if args.seconds is not None and not (args.seconds > 0 and args.seconds < float("inf")):
        raise UserError(f"--seconds must be a positive number, got {args.seconds}")
    if same_file(args.out, args.data):
        raise UserError(f"--out {args.out} is the --data folder; choose another output folder")


def _pipeline_flags(args: argparse.Namespace, device: str | None = None) -> dict[str, Any]:
    """The pipeline flags every job shares (the per-job paths are added by :func:`_generate`)."""
    return {"device": device or args.device, "random_weights": True if args.random_weights else None}


def _pipeline_config(args: argparse.Namespace) -> str | None:
    return None if args.config is None else str(repo_path(args.config))


def _pipeline_settings(args: argparse.Namespace) -> dict:
    """The resolved pipeline settings without the per-job ones: checked here (values and the
    checkpoint files), before any work."""
    for item in args.set or []:
        key = item.partition("=")[0].strip()
        if key in PER_JOB:
            raise UserError(f"--set {item}: {key} is set for each video by the protocol (or by its own flag)")
    cfg = resolve(_pipeline_config(args), _pipeline_flags(args), args.set or [])
    check_settings(cfg)
    check_assets(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in plain.items() if k not in PER_JOB}


def _select(
    args: argparse.Namespace, requested: list[str] | None
) -> tuple[list[str] | None, tuple[str, ...]]:
    """(requested metrics, pool of defaults) for the protocol; cross_identity allows only the
    no-reference ones."""
    from evaluation import weights

    if args.protocol != "cross_identity":
        return requested, weights.METRICS
    bad = [m for m in requested or () if m not in NO_REFERENCE]
    if bad:
        raise UserError(
            "cross_identity has no real counterpart of the generated video, so only "
            f"{', '.join(NO_REFERENCE)} can run; drop {', '.join(bad)} from --metrics"
        )
    return requested, NO_REFERENCE


# ----------------------------------------------------------------------------- the manifest
class Manifest:
    """``OUT/protocol.json``: the settings the videos under OUT were made with, and the finished ones."""

    def __init__(self, out: Path, settings: dict, overwrite: bool) -> None:
        self.path, self.out = out / MANIFEST, out
        self.settings = settings
        self.done: list[str] = []
        self.files: dict[str, dict[str, list]] = {}  # name -> {relative path: [size, sha256]}
        if self.path.is_file() and not overwrite:
            try:
                old = json.loads(self.path.read_text())
                old_settings, done = old["settings"], list(old["done"])
                self.files = dict(old.get("files", {}))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"cannot read {self.path} ({exc}); pass --overwrite to start over") from exc
            if old_settings != settings:
                diff = sorted(_diff(old_settings, settings))
                raise UserError(
                    f"{out} holds videos made with other settings (differ: {', '.join(diff[:4])}); "
                    "pass --overwrite to regenerate them, or choose another --out"
                )
            self.done = done
        elif not overwrite and any((out / "generated").glob("*.mp4")):
            raise UserError(
                f"{out / 'generated'} holds videos but no {MANIFEST} (not made by this protocol); "
                "pass --overwrite to regenerate, or choose another --out"
            )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Several ranks record finished videos in one file: one writer at a time."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _on_disk(self) -> tuple[list[str], dict[str, dict[str, list]]]:
        try:
            old = json.loads(self.path.read_text())
            if old.get("settings") != self.settings:
                return [], {}
            return list(old["done"]), dict(old.get("files", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [], {}

    def save(self) -> None:
        record = {"settings": self.settings, "done": self.done, "files": self.files}
        atomic_write_text(self.path, json.dumps(record, indent=2) + "\n")

    def finish(self, name: str, paths: Paths | None = None) -> None:
        """Record ``name`` as done (with the size and sha256 of its audio, real and generated files),
        with what the other ranks recorded meanwhile."""
        mine = fileio.path_records(self.out, (paths.wav, paths.real, paths.generated)) if paths else {}
        with self._locked():
            done, files = self._on_disk()
            self.done = done + [n for n in [*self.done, name] if n not in done]
            self.done = list(dict.fromkeys(self.done))
            self.files = {**files, **self.files, **({name: mine} if mine else {})}
            self.save()

    def problem(self, name: str, paths: Paths) -> str | None:
        """What is wrong with a finished video's files (None: as recorded when it was finished; one
        recorded before the records existed: its clips are there)."""
        if name not in self.files:
            return None if paths.real.is_file() and paths.generated.is_file() else "a clip is missing"
        return fileio.folder_problem(self.out, self.files[name])


def _diff(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k for key in set(a) | set(b) for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")}
    return set() if a == b else {prefix.rstrip(".")}


# ----------------------------------------------------------------------------- one job
@dataclass(frozen=True)
class Paths:
    wav: Path
    real: Path
    generated: Path
    log: Path
    work: Path

    @classmethod
    def of(cls, out: Path, name: str, work_dir: str | None) -> Paths:
        work = Path(work_dir) if work_dir else out / "work" / name
        return cls(
            out / "audio" / f"{name}.wav",
            out / "real" / f"{name}.mp4",
            out / "generated" / f"{name}.mp4",
            out / "logs" / f"{name}.log",
            work,
        )


def _prepare(job: Job, paths: Paths, seconds: float | None) -> int:
    """The driving audio and the real clip of ``job`` -> their number of frames."""
    from data.audio import save_wav

    wave = clips.load_wave(job.audio)
    n = clips.clip_length(job.ref, wave, seconds)
    if n < 1:
        raise UserError(f"{job.name}: {job.audio} or {job.ref} holds less than one frame of audio and video")
    own = wave if job.ref == job.audio else clips.load_wave(job.ref)
    save_wav(paths.wav, clips.fit_audio(wave, n))
    clips.write_real_clip(paths.real, job.ref, n, own)
    return n


def _generate(
    job: Job,
    paths: Paths,
    config: str | None,
    flags: dict[str, Any],
    overrides: list[str],
    models: ModelCache | None = None,
) -> None:
    """One pipeline run: ``paths.wav`` drives ``job.ref`` into ``paths.generated`` (with the networks
    of ``models``, kept warm between the jobs of a rank)."""
    own = {"audio": str(paths.wav), "ref_video": str(job.ref), "out": str(paths.generated)}
    own |= {"work_dir": str(paths.work), "overwrite": True}
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    with open(paths.log, "w") as log:
        try:
            cfg = resolve(config, {**flags, **own}, overrides)
            run_inference(
                cfg, log=lambda line: print(line, file=log, flush=True), progress=False, models=models
            )
        except UserError as exc:
            raise UserError(f"{job.name}: {exc}") from exc


# ----------------------------------------------------------------------------- the protocol
def run(args: argparse.Namespace, requested: list[str] | None, overrides: dict[str, str]) -> dict:
    """Generate (or reuse) every job's video, then score them; the report with a ``generation`` part."""
    _check_flags(args)
    out = Path(args.out)
    videos = clips.find_videos(args.data)
    jobs = make_jobs(args, videos)
    requested, pool = _select(args, requested)
    json_path = Path(args.json) if args.json else out / "report.json"
    table_path = json_path.with_suffix(".txt")
    if table_path == json_path:  # --json r.txt: the table would replace the report
        raise UserError(f"--json {json_path} ends in .txt, the table's name beside it; name it .json")
    inputs = [args.split_file, None if args.pairs == "auto" else args.pairs, *videos.values()]
    for path in (json_path, table_path):
        try:
            check_output(path, args.overwrite, inputs)
        except UserError as exc:
            if "--overwrite" not in str(exc):
                raise
            raise UserError(
                f"{exc} (which also regenerates every video); or pass --json OTHER.json to score the "
                "finished videos again"
            ) from None
    for job in jobs:
        p = Paths.of(out, job.name, args.work_dir)
        for path in (p.wav, p.real, p.generated, p.log):
            check_output(path, True, [job.audio, job.ref])
    settings = {
        "protocol": args.protocol,
        "data": str(Path(args.data).resolve()),
        "seconds": args.seconds,
        "pipeline": _pipeline_settings(args),
    }
    for source in dict.fromkeys(j.audio for j in jobs):
        clips.check_audio(source)
    if args.overwrite and args.num_shards > 1:
        raise UserError(
            "--overwrite with --num_shards > 1 would let each job restart the others' videos; run once "
            "with --overwrite and without --shard, or remove --out first"
        )
    ranks = bulk.start(args.shard, args.num_shards)
    try:
        return _run_ranks(args, requested, overrides, out, jobs, settings, pool, json_path, ranks)
    finally:
        ranks.close()


def _run_ranks(
    args: argparse.Namespace,
    requested: list[str] | None,
    overrides: dict[str, str],
    out: Path,
    jobs: list[Job],
    settings: dict,
    pool: tuple[str, ...],
    json_path: Path,
    ranks: bulk.Ranks,
) -> dict:
    """Generate this rank's share, gather the failures, score (rank 0 writes the report)."""
    table_path = json_path.with_suffix(".txt")
    if ranks.is_main:  # the settings check (and --overwrite's reset) once, before any rank records
        first = Manifest(out, settings, args.overwrite)
        with first._locked():  # independent shards may be recording already
            if not args.overwrite:
                done, files = first._on_disk()
                first.done = list(dict.fromkeys(done + first.done))
                first.files = {**files, **first.files}
            first.save()
    ranks.barrier()
    manifest = Manifest(out, settings, overwrite=False)  # what rank 0 wrote

    flags = _pipeline_flags(args, ranks.device(args.device))
    mine = ranks.share(jobs, key=lambda j: j.name)
    models = ModelCache()
    generated, reused, failed = [], [], {}
    with ranks.bar(mine, desc=f"{args.protocol}: generate", unit="video", disable=args.no_progress) as bar:
        for job in bar:
            bar.set_postfix_str(job.name)
            paths = Paths.of(out, job.name, ranks.own_folder(args.work_dir))
            if job.name in manifest.done:  # checked before it is trusted
                problem = manifest.problem(job.name, paths)
                if problem is None:
                    reused.append(job.name)
                    continue
                ranks.log(f"warning: {job.name}: {problem}; generating it again", file=sys.stderr)
            try:
                _prepare(job, paths, args.seconds)
                _generate(job, paths, _pipeline_config(args), flags, list(args.set or []), models)
            except UserError as exc:
                failed[job.name] = str(exc).removeprefix(f"{job.name}: ")
                ranks.log(f"{job.name}: failed: {failed[job.name]}")
                continue
            if args.work_dir is None:
                shutil.rmtree(paths.work, ignore_errors=True)
            manifest.finish(job.name, paths)
            generated.append(job.name)
            if ranks.world > 1:
                ranks.log(f"{job.name}: generated -> {paths.generated}")
    if ranks.world > 1:
        ranks.log(f"{len(generated)} generated, {len(reused)} reused, {len(failed)} failed")
    models.clear()
    if args.work_dir is None and (out / "work").is_dir() and not any((out / "work").iterdir()):
        try:
            (out / "work").rmdir()
        except OSError:  # another rank's work folder appeared meanwhile
            pass
    everyone = ranks.all_gather((generated, reused, failed))
    if any(part[2] for part in everyone):
        ranks.finish(failed, total=len(jobs), what="videos")
        return {}
    if ranks.num_shards > 1:
        ranks.log(
            f"shard {ranks.shard}/{ranks.num_shards}: its videos are done; run the same command without "
            "--shard/--num_shards to score every video"
        )
        return {}
    done = {n for part in everyone for n in part[0]}
    generated = [j.name for j in jobs if j.name in done]
    kept = {n for part in everyone for n in part[1]}
    reused = [j.name for j in jobs if j.name in kept]

    pairs = []
    for job in jobs:
        paths = Paths.of(out, job.name, args.work_dir)
        n_p, n_g = count_frames(paths.generated, FPS), count_frames(paths.real, FPS)
        check_lengths(job.name, n_p, n_g)
        pairs.append(VideoPair(job.name, paths.generated, paths.real, min(n_p, n_g), n_p, n_g))
    report = score_args(args, pairs, requested, overrides, ranks=ranks, pool=pool)
    if report is None:  # not rank 0: it writes the report
        return {}
    report["settings"] = {
        "generation": {
            **settings,
            "split_file": args.split_file,
            "pairs": args.pairs,
            "out": str(out),
            "max_videos": args.max_videos,
            "jobs": {j.name: {"audio_id": j.audio_id, "ref_id": j.ref_id} for j in jobs},
            "generated": generated,
            "reused": reused,
        },
        "pred": str(out / "generated"),
        "gt": str(out / "real"),
        **report["settings"],
    }
    write_report(report, str(json_path))
    atomic_write_text(table_path, format_table(report["metrics"], report["reference"]) + "\n")
    return report
