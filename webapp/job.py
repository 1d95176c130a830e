"""The job behind the web page (:mod:`webapp.app`), without the web part: one request's config, its
run through :func:`pipeline.inference.run_inference` with the warm networks, the progress it reports,
and the app's folder, cleaned of what is older than a day.

Layout of the app folder (``--out_dir``, default ``outputs/app``)::

    uploads/        what the page receives (Gradio's cache: GRADIO_TEMP_DIR), one folder per upload
    runs/<id>/      one request's talking_head.mp4, talking_head_preview.mp4 and talking_head.yaml
    work/<name>/    the stage cache shared by the requests (same reference: its stages are reused)
    examples/       the bundled sample (speech, reference photo and video), written at start
    .moditalker-app marks the folder as the app's: since the app deletes old files in it, it takes
                    only a new or empty folder, or one it has marked
"""

from __future__ import annotations

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
from moditalker.fileio import atomic_path, atomic_write_text
from pipeline.events import DESCRIBE, STAGES, TIMING_ORDER, StageEvents
from pipeline.inference import PipelineResult, run_inference
from pipeline.models import ModelCache
from pipeline.resolve import resolve
from pipeline.settings import FLAGS, SETTINGS, check_settings

__all__ = [
    "APP_MARKER",
    "DAY",
    "PAGE_SETTINGS",
    "page_name",
    "AppFolders",
    "clean_old",
    "PageJob",
    "JobOutput",
    "PageProgress",
    "public_text",
]

DAY = 24 * 3600.0
MB = 1024 * 1024  #: bytes in a MB of --max_upload_mb (Gradio's "mb")
#: the settings the page offers, in the order of the endpoint's parameters: keys of the schema
#: (:mod:`pipeline.settings`), which gives their labels, defaults, types and ranges
PAGE_SETTINGS = (
    "seed",
    "atom.steps",
    "atom.guidance_weight",
    "mtov.sampling_timesteps",
    "mtov.start_ratio",
    "mtov.batch_size",
)
assert all(SETTINGS[key].label for key in PAGE_SETTINGS), "a setting of the page has no label"


def page_name(key: str) -> str:
    """A page setting's name as a parameter of the endpoint and an element of the page: its flag (as
    on the command line), else the last part of its key (``mtov.start_ratio`` -> ``start_ratio``)."""
    return SETTINGS[key].flag or SETTINGS[key].name


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
    **{f"--{SETTINGS[key].flag}": str(SETTINGS[key].label) for key in PAGE_SETTINGS if SETTINGS[key].flag},
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
#: the file that marks an --out_dir as the app's (:meth:`AppFolders.create`)
APP_MARKER = ".moditalker-app"


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

    @property
    def marker(self) -> Path:
        return self.root / APP_MARKER

    def _unmarked_app_folder(self) -> bool:
        """Empty (hidden files aside), or an app folder from before the marker: only the app's four
        folders, examples/ among them (the app writes it at start; a training folder's runs/ comes
        without it)."""
        names = {p.name for p in self.root.iterdir() if not p.name.startswith(".")}  # .DS_Store etc.
        parts = {p.name for p in (self.uploads, self.runs, self.work, self.examples)}
        return not names or (names <= parts and self.examples.name in names)

    def check(self) -> AppFolders:
        """Refuse, creating nothing, a folder that holds files but not the app's marker: the app deletes
        old files under ``uploads/``, ``runs/`` and ``work/``, which in another folder (a checkout, a
        training folder with its own ``runs/``) would be somebody's results."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out_dir {self.root} is a file, not a folder")
        if self.marker.exists() and not self.marker.is_file():
            raise UserError(f"{self.marker} is not a file (the app's marker is written there); remove it")
        if self.root.is_dir() and not self.marker.is_file() and not self._unmarked_app_folder():
            raise UserError(
                f"--out_dir {self.root} already holds files and is not a folder of this app (no "
                f"{APP_MARKER} in it); the app deletes old files under its uploads/, runs/ and work/, "
                "so give it a new or empty folder"
            )
        return self

    def create(self) -> AppFolders:
        """Make the folders (after :meth:`check`)."""
        self.check()
        for folder in (self.uploads, self.runs, self.work, self.examples):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot create {folder} ({exc.strerror}); choose another --out_dir") from exc
        if not self.marker.is_file():
            atomic_write_text(self.marker, "folder of the MoDiTalker web page (python -m webapp.app)\n")
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
class PageProgress(StageEvents):
    """The page's progress, from the run's stage events: ``report(fraction, text)`` when a stage
    starts (``7/8 mtov: MToV: video frames``), as its units are done (``..., 120 of 500 frames``), and
    ``(1.0, "done")`` when the last has finished."""

    def __init__(self, report: Callable[[float, str], None]) -> None:
        self.report = report

    def started(self, stage: str) -> None:
        if stage in STAGES:
            i, n = STAGES.index(stage), len(STAGES)
            self.report(i / n, f"{i + 1}/{n} {stage}: {DESCRIBE[stage]}")

    def progress(self, stage: str, done: int, total: int) -> None:
        if stage in STAGES and total > 0:
            i, n = STAGES.index(stage), len(STAGES)
            self.report(
                (i + done / total) / n, f"{i + 1}/{n} {stage}: {DESCRIBE[stage]}, {done} of {total} frames"
            )

    def finished(self, stage: str, *, cached: bool, seconds: float, entry: Path | None = None) -> None:
        if stage == STAGES[-1]:
            self.report(1.0, "done")


# ----------------------------------------------------------------------------- the job
@dataclass
class JobOutput:
    """What one request gives back."""

    video: Path
    preview: Path
    timings: dict[str, float]
    log: str
    result: PipelineResult


class PageJob:
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
        self.folders = folders.check()
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
        self.folders.create()  # after every check: a refused start leaves no folder behind

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
        """The config of a run with these flags or settings (names as :func:`pipeline.resolve.resolve`
        takes them; None: unset) on top of the app's: a setting the request gives wins over the app's
        ``key=value`` of the same key."""
        keys = {FLAGS.get(name, name) for name, value in flags.items() if value is not None}
        overrides = [o for o in self.overrides if o.partition("=")[0].strip() not in keys]
        app = {"device": self.device, "random_weights": True if self.random_weights else None}
        return resolve(self.config, {**app, **flags}, overrides)

    def defaults(self) -> dict[str, Any]:
        """The page's settings (:data:`PAGE_SETTINGS`, by their page names) as the base config has them."""
        return {page_name(key): OmegaConf.select(self.base, key) for key in PAGE_SETTINGS}

    def work_dir(self, cfg: DictConfig) -> Path:
        """The stage cache of a run: shared by all real-weight runs; per seed with random weights (the
        synthetic BFM in it is made from the seed)."""
        return self.folders.work / (f"random-seed{int(cfg.seed)}" if cfg.random_weights else "shared")

    def request_config(
        self, audio: str | None, ref_video: str | None, ref_image: str | None, out: Path, **settings: Any
    ) -> DictConfig:
        """The run's config: the base config with this request's inputs and ``settings`` (the page's,
        by their page names; None: the base's)."""
        keys = {page_name(key): key for key in PAGE_SETTINGS}
        unknown = sorted(set(settings) - set(keys))
        if unknown:
            raise TypeError(f"not a setting of the page: {', '.join(unknown)}")
        flags = {
            "audio": audio,
            "ref_video": ref_video,
            "ref_image": ref_image,
            "out": str(out),
            "preview": True,
        }
        cfg = self.resolve(**flags, **{keys[name]: value for name, value in settings.items()})
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
            lines: list[str] = []

            def log(line: str) -> None:
                lines.append(line)
                self.log(line)

            events = PageProgress(report) if report is not None else None
            try:
                cfg = self.request_config(audio, ref_video, ref_image, run_dir / self.OUT_NAME, **settings)
                result = run_inference(
                    cfg, log=log, progress=False, detector=self.detector, models=self.models, events=events
                )
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            order = [*TIMING_ORDER, *sorted(set(result.timings) - {*TIMING_ORDER, "total"}), "total"]
            timings = {k: round(float(result.timings[k]), 3) for k in order if k in result.timings}
            assert result.preview is not None
            return JobOutput(result.out, result.preview, timings, self.public("\n".join(lines)), result)


def sample_inputs(folders: AppFolders) -> dict[str, Path]:
    """The bundled sample in ``examples/``: the speech clip, the reference photo and a 2 s video."""
    from data.sample_data import SAMPLE_SPEECH, write_reference_image, write_reference_video

    ex = folders.examples
    ex.mkdir(parents=True, exist_ok=True)
    paths = {"speech": ex / "speech.wav", "photo": ex / "reference.png", "video": ex / "reference.mp4"}
    if not paths["speech"].is_file():
        if not SAMPLE_SPEECH.is_file():
            raise UserError(f"sample speech clip not found: {SAMPLE_SPEECH}; restore assets/sample/ from git")
        with atomic_path(paths["speech"]) as tmp:  # whole or absent: an existing file is trusted
            shutil.copyfile(SAMPLE_SPEECH, tmp)
    if not paths["photo"].is_file():
        write_reference_image(paths["photo"])
    if not paths["video"].is_file():
        write_reference_video(paths["video"], seconds=2.0)
    return paths
