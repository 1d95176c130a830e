"""The job behind the web page (:mod:`pipeline.app`), without the web part: one request's config, its
run through :func:`pipeline.inference.run_inference` with the warm networks, the progress it reports,
and the app's folder, cleaned of what is older than a day.

Layout of the app folder (``--out_dir``, default ``outputs/app``)::

    uploads/        what the page receives (Gradio's cache: GRADIO_TEMP_DIR), one folder per upload
    runs/<id>/      one request's talking_head.mp4, talking_head_preview.mp4 and talking_head.yaml
    work/<name>/    the stage cache shared by the requests (same reference: its stages are reused)
    examples/       the bundled sample (speech, reference photo and video), written at start
"""

from __future__ import annotations

import argparse
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moditalker.errors import UserError
from pipeline.inference import PipelineResult, resolve_config, run_inference
from pipeline.models import ModelCache
from pipeline.settings import FLAGS, check_settings

__all__ = ["DAY", "STAGES", "AppFolders", "clean_old", "Job", "JobOutput", "StageProgress", "public_text"]

DAY = 24 * 3600.0
MB = 1024 * 1024  #: bytes in a MB of --max_upload_mb (Gradio's "mb")
#: the steps a run reports, in order (the cached stages, then the mp4 writer)
STAGES = ("reference", "landmarks", "recon", "hubert", "atom", "align", "mtov", "write")
#: the order of the timings the page shows (others follow, then the total)
TIMING_ORDER = ("reference", "landmarks", "recon", "hubert", "atom", "align", "render", "mtov", "write")
_STAGE_DONE = re.compile(r"^\[(\w+)\] (?:computed|reused)\b")
_DESCRIBE = {
    "reference": "reading the reference",
    "landmarks": "face landmarks",
    "recon": "3D face reconstruction",
    "hubert": "speech features",
    "atom": "AToM: motion",
    "align": "aligning the motion",
    "mtov": "MToV: video frames",
    "write": "writing the mp4",
}


# ----------------------------------------------------------------------------- what callers see
_PATH_CHARS = r"[^\s'\"`,;()\[\]{}<>|]"
#: an absolute path: a "/" not inside a word, a number ("1/2"), a URL ("http://") or a relative path
_ABS_PATH = re.compile(r"(?<![\w.:/~\-])/" + _PATH_CHARS + "+")


#: a message's command-line flags in the page's words (the page has fields and tabs, not flags);
#: the longer phrases first
PAGE_WORDS = {
    "--ref_video VIDEO or --ref_image PHOTO": "a face video or a face photo",
    "a photo with --ref_image": "a photo in the Face photo tab",
    " (--max_upload_mb)": "",
    "--ref_video": "the face video",
    "--ref_image": "the face photo",
    "--audio": "the speech",
    "--steps": "AToM steps",
    "--guidance": "AToM guidance",
    "--mtov_steps": "MToV steps",
    "--batch_size": "MToV clips per batch",
    "--seed": "the seed",
}
_PAGE_WORD = re.compile("|".join(re.escape(k) + (r"\b" if k[-1].isalnum() else "") for k in PAGE_WORDS))


def page_text(text: str) -> str:
    """A one-line error as the page shows it: the command line's flags named as the page's fields
    (``a reference is required: --ref_video VIDEO or --ref_image PHOTO`` -> ``... a face video or a
    face photo``); the setting keys (``atom.steps must be >= 1``) stay as the config files name them."""
    return _PAGE_WORD.sub(lambda m: PAGE_WORDS[m.group(0)], text)


def public_text(text: str, roots: tuple[str | Path, ...] = ()) -> str:
    """``text`` with every absolute path of this machine replaced by its base name (``/srv/app/uploads/
    3f2a/speech.wav`` -> ``speech.wav``): what the page returns to a caller (the run log, error
    messages) names no folder of the server. ``roots``: folders whose names may hold spaces, replaced
    first (with whatever follows them up to the next space)."""
    roots_text = sorted({str(r).rstrip("/") for r in roots if str(r).rstrip("/")}, key=len, reverse=True)
    for root in roots_text:
        pattern = re.escape(root) + f"(?:/{_PATH_CHARS}*)?(?!{_PATH_CHARS})"
        text = re.sub(pattern, lambda m: PurePosixPath(m.group(0)).name or ".", text)
    return _ABS_PATH.sub(lambda m: PurePosixPath(m.group(0)).name or ".", text)


# ----------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class AppFolders:
    """The app's folder and its parts (see the module docstring)."""

    root: Path

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def examples(self) -> Path:
        return self.root / "examples"

    def create(self) -> AppFolders:
        for folder in (self.uploads, self.runs, self.work, self.examples):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create {folder} ({exc.strerror}); choose another --out_dir") from exc
        return self

    def new_run(self) -> Path:
        """A fresh ``runs/<time>-<n>`` folder."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            folder = self.runs / f"{stamp}-{n:03d}"
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        raise RuntimeError(f"no free run folder under {self.runs}")


def _newest_mtime(path: Path) -> float:
    """The newest mtime of ``path`` and, for a folder, of everything under it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            try:
                newest = max(newest, p.lstat().st_mtime)
            except FileNotFoundError:
                continue
    return newest


def clean_old(folders: AppFolders, max_age: float = DAY, now: float | None = None) -> list[Path]:
    """Remove what is older than ``max_age`` seconds (by its newest file) from the uploads, the runs
    and the work folders, each upload, run and stage-cache entry as a whole (never half an entry), and
    the emptied work folders; the examples stay. Returns what was removed (not the empty folders)."""
    cutoff = (time.time() if now is None else now) - max_age
    units: list[Path] = []
    for parent in (folders.uploads, folders.runs):
        units += list(parent.iterdir()) if parent.is_dir() else []
    if folders.work.is_dir():
        for work in folders.work.iterdir():
            units += list(work.iterdir()) if work.is_dir() else [work]
    removed = []
    for unit in units:
        try:
            if _newest_mtime(unit) >= cutoff:
                continue
            if unit.is_dir() and not unit.is_symlink():
                shutil.rmtree(unit)
            else:
                unit.unlink()
        except FileNotFoundError:
            continue
        removed.append(unit)
    for work in folders.work.iterdir() if folders.work.is_dir() else ():
        if work.is_dir() and not any(work.iterdir()):  # emptied (runs are one at a time: none is using it)
            work.rmdir()
    return removed


# ----------------------------------------------------------------------------- progress
class StageProgress:
    """Turns the run's log lines into progress: ``report(fraction, text)`` after each stage
    (``[stage] computed ...`` / ``[stage] reused ...``), naming the step that comes next."""

    def __init__(self, report: Callable[[float, str], None] | None, log: Callable[[str], None]) -> None:
        self.report, self.log, self.lines = report, log, []
        self.done = 0

    def start(self) -> None:
        self._report(0)

    def _report(self, done: int) -> None:
        self.done = done
        if self.report is None:
            return
        if done < len(STAGES):
            stage = STAGES[done]
            self.report(done / len(STAGES), f"{done + 1}/{len(STAGES)} {stage}: {_DESCRIBE[stage]}")
        else:
            self.report(1.0, "done")

    def finish(self) -> None:
        self._report(len(STAGES))

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self.log(line)
        match = _STAGE_DONE.match(line)
        if match and match.group(1) in STAGES:
            self._report(max(self.done, STAGES.index(match.group(1)) + 1))


# ----------------------------------------------------------------------------- the job
@dataclass
class JobOutput:
    """What one request gives back."""

    video: Path
    preview: Path
    timings: dict[str, float]
    log: str
    result: PipelineResult


def _integral(value: Any) -> Any:
    """A whole float (what a web number field sends) as an int; anything else as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class Job:
    """Runs one request: the base config (``--config`` + the app's flags + ``key=value``), the request's
    inputs and settings on top, exactly as ``scripts/inference.sh`` would resolve the same flags, then
    the pipeline with the warm networks (:class:`ModelCache`, one for the job's life). Requests are run
    one at a time (a lock; the page's queue keeps the others waiting)."""

    OUT_NAME = "talking_head.mp4"

    def __init__(
        self,
        folders: AppFolders,
        *,
        config: str | None = None,
        device: str | None = None,
        random_weights: bool = False,
        overrides: tuple[str, ...] = (),
        max_age: float = DAY,
        max_upload_mb: float | None = None,
        models: ModelCache | None = None,
        detector: Any = None,
        log: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.folders = folders.create()
        self.config, self.device, self.random_weights = config, device, bool(random_weights)
        self.overrides = tuple(overrides)
        self.max_age = float(max_age)
        self.max_upload_mb = None if max_upload_mb is None else float(max_upload_mb)
        self.models = ModelCache(per_kind=1) if models is None else models
        self.detector, self.log = detector, log
        self.lock = threading.Lock()
        self.base = self.resolve()  # a bad --config, flag or override stops the app before it starts
        check_settings(self.base)
        from moditalker.device import resolve_device

        resolve_device(self.base.device)

    def public(self, text: str) -> str:
        """``text`` as the page may return it: no absolute path of this machine (:func:`public_text`)."""
        from moditalker.fileio import REPO_ROOT

        root = self.folders.root
        return public_text(text, (root.resolve(), root.absolute(), REPO_ROOT, Path.cwd(), Path.home()))

    def check_sizes(self, **files: str | None) -> None:
        """Refuse an input file over ``max_upload_mb`` (the page refuses such an upload before it is
        stored; this also covers files given by path)."""
        if self.max_upload_mb is None:
            return
        for name, path in files.items():
            if path is None or not Path(path).is_file():
                continue
            size = Path(path).stat().st_size
            if size > self.max_upload_mb * MB:
                raise UserError(
                    f"{name} {Path(path).name} is {size / MB:.1f} MB, over the page's limit of "
                    f"{self.max_upload_mb:g} MB (--max_upload_mb)"
                )

    def resolve(self, **flags: Any) -> DictConfig:
        """The config of a run with these command-line flags (names as in :data:`FLAGS`; None: unset)."""
        args = argparse.Namespace(**{name: None for name in FLAGS}, config=self.config)
        args.overrides = list(self.overrides)
        args.device = self.device
        args.random_weights = True if self.random_weights else None
        for name, value in flags.items():
            if name not in FLAGS:
                raise KeyError(name)
            setattr(args, name, _integral(value))
        return resolve_config(args)

    def defaults(self) -> dict[str, Any]:
        """The settings the page shows, as the base config has them."""
        c = self.base
        return {
            "seed": int(c.seed),
            "steps": int(c.atom.steps),
            "guidance": float(c.atom.guidance_weight),
            "mtov_steps": int(c.mtov.sampling_timesteps),
            "start_ratio": float(c.mtov.start_ratio),
            "batch_size": int(c.mtov.batch_size),
        }

    def work_dir(self, cfg: DictConfig) -> Path:
        """The stage cache of a run: shared by all real-weight runs; per seed with random weights (the
        synthetic BFM in it is made from the seed)."""
        return self.folders.work / (f"random-seed{int(cfg.seed)}" if cfg.random_weights else "shared")

    def request_config(
        self,
        audio: str | None,
        ref_video: str | None,
        ref_image: str | None,
        out: Path,
        *,
        seed: Any = None,
        steps: Any = None,
        guidance: Any = None,
        mtov_steps: Any = None,
        start_ratio: Any = None,
        batch_size: Any = None,
    ) -> DictConfig:
        """The run's config: the base config with this request's inputs and settings (None: the base's)."""
        flags = {"audio": audio, "ref_video": ref_video, "ref_image": ref_image, "out": str(out)}
        flags |= {"seed": seed, "steps": steps, "guidance": guidance, "mtov_steps": mtov_steps}
        flags |= {"batch_size": batch_size, "preview": True}
        cfg = self.resolve(**flags)
        if start_ratio is not None:  # no flag of its own: mtov.start_ratio
            OmegaConf.update(cfg, "mtov.start_ratio", _integral(start_ratio), merge=False)
        cfg.work_dir = str(self.work_dir(cfg))
        return cfg

    def __call__(
        self,
        audio: str | None,
        ref_video: str | None = None,
        ref_image: str | None = None,
        *,
        report: Callable[[float, str], None] | None = None,
        **settings: Any,
    ) -> JobOutput:
        """Run one request; a :class:`UserError` carries the same one line as the command line's."""
        with self.lock:
            self.check_sizes(audio=audio, ref_video=ref_video, ref_image=ref_image)
            clean_old(self.folders, self.max_age)
            run_dir = self.folders.new_run()
            progress = StageProgress(report, self.log)
            try:
                cfg = self.request_config(audio, ref_video, ref_image, run_dir / self.OUT_NAME, **settings)
                progress.start()
                result = run_inference(
                    cfg, log=progress, progress=True, detector=self.detector, models=self.models
                )
                progress.finish()
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            order = [*TIMING_ORDER, *sorted(set(result.timings) - {*TIMING_ORDER, "total"}), "total"]
            timings = {k: round(float(result.timings[k]), 3) for k in order if k in result.timings}
            assert result.preview is not None
            log = self.public("\n".join(progress.lines))
            return JobOutput(result.out, result.preview, timings, log, result)


def sample_inputs(folders: AppFolders) -> dict[str, Path]:
    """The bundled sample in ``examples/``: the speech clip, the reference photo and a 2 s video."""
    from pipeline.sample_data import SAMPLE_SPEECH, write_reference_image, write_reference_video

    ex = folders.examples
    ex.mkdir(parents=True, exist_ok=True)
    paths = {"speech": ex / "speech.wav", "photo": ex / "reference.png", "video": ex / "reference.mp4"}
    if not paths["speech"].is_file():
        if not SAMPLE_SPEECH.is_file():
            raise UserError(f"sample speech clip not found: {SAMPLE_SPEECH}; restore assets/sample/ from git")
        shutil.copyfile(SAMPLE_SPEECH, paths["speech"])
    if not paths["photo"].is_file():
        write_reference_image(paths["photo"])
    if not paths["video"].is_file():
        write_reference_video(paths["video"], seconds=2.0)
    return paths
