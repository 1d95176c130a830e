"""Work-folder cache: every pipeline stage stores its outputs under a key hashed from its inputs.

A stage's key covers everything its result depends on (input file digests, upstream stage keys,
checkpoint identities, settings), so a re-run with the same inputs and settings reuses the
stored arrays, and changing, say, only MToV settings recomputes only MToV. Each stage writes
into a temp folder that is renamed into place when complete, so an interrupted run never leaves
a half-written entry that a later run would trust.

An entry's ``.done`` records the size and sha256 of each of its files when it is committed; a run
checks them before it reuses the entry, and an entry with a missing, truncated or changed file is
recomputed (a ``warning:`` line names the entry and the file), which gives what a clean run gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moditalker.errors import DiskFullError, bytes_in, free_bytes, is_disk_full
from moditalker.fileio import folder_problem, folder_records, json_or_none, remove_path
from pipeline.events import StageEvents, StageLog

__all__ = ["OLDER_LAYOUT", "asset_identity", "done_record", "stable_key", "StageRecord", "WorkCache"]


def asset_identity(path: str | Path | None) -> str:
    """Cheap identity of a checkpoint file or folder: resolved path, sizes and mtimes (no hashing)."""
    if path is None:
        return "none"
    path = Path(path)
    if not path.exists():
        return f"missing:{path}"
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    parts = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return f"{path.resolve()}[{';'.join(parts)}]"


def stable_key(parts: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the JSON of ``parts`` (sorted keys)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: what :func:`done_record` says of a ``.done`` without file records (an entry of an older layout)
OLDER_LAYOUT = "it was written without file hashes (an older layout)"


def done_record(entry: Path) -> tuple[dict, str | None]:
    """The ``.done`` record of a committed entry (a dict with its ``files``) and None, or ``{}`` and
    what is wrong with it: unreadable, or :data:`OLDER_LAYOUT`."""
    record = json_or_none(entry / ".done")
    if record is None:
        return {}, "its .done record cannot be read"
    if not isinstance(record, dict) or "files" not in record:
        return {}, OLDER_LAYOUT
    return record, None


@dataclass
class StageRecord:
    """What happened to one stage in this run."""

    name: str
    key: str
    folder: Path
    cached: bool
    seconds: float


@dataclass
class WorkCache:
    """Stage outputs under ``folder/<stage>-<key>/<name>.npy`` (plus any extra files the stage writes)."""

    folder: Path
    records: dict[str, StageRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)

    def entry(self, stage: str, key: str) -> Path:
        return self.folder / f"{stage}-{key}"

    def run(
        self,
        stage: str,
        parts: Mapping[str, Any],
        compute: Callable[[Path], Mapping[str, np.ndarray]],
        log: Callable[[str], None] = print,
        events: StageEvents | None = None,
    ) -> tuple[dict[str, np.ndarray], str]:
        """Load stage ``stage`` for ``parts`` from the cache, or run ``compute(tmp_folder)`` and store it.

        ``compute`` returns named arrays (saved as ``.npy``) and may write extra files (PNGs) into the
        folder it is given. Returns ``(arrays, key)``. The stage's start and end go to ``events``
        (None: its lines to ``log``, :class:`pipeline.events.StageLog`); warnings go to ``log``.
        """
        events = StageLog(log) if events is None else events
        key = stable_key({"stage": stage, **parts})
        entry = self.entry(stage, key)
        events.started(stage)
        start = time.perf_counter()
        done = entry / ".done"
        if done.is_file():
            problem, arrays = self._load(entry)
            if problem is None:
                self.finish(StageRecord(stage, key, entry, True, time.perf_counter() - start), events)
                return arrays, key
            log(f"warning: stage cache entry {entry.name}: {problem}; recomputing {stage}")
            shutil.rmtree(entry, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-{key}.", dir=self.folder))
        try:
            arrays = self._compute(entry, tmp, parts, compute)
            remove_path(entry)  # a stale, unfinished entry (an older layout), or a file not ours
            os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.finish(StageRecord(stage, key, entry, False, time.perf_counter() - start), events)
        return arrays, key

    def finish(self, record: StageRecord, events: StageEvents) -> None:
        """Keep ``record`` as its stage's outcome in this run and tell ``events`` that the stage ended."""
        self.records[record.name] = record
        events.finished(record.name, cached=record.cached, seconds=record.seconds, entry=record.folder)

    @staticmethod
    def _compute(
        entry: Path, tmp: Path, parts: Mapping[str, Any], compute: Callable[[Path], Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """``compute(tmp)``, its arrays, ``parts.json`` and the ``.done`` record written in ``tmp``; a
        full disk is a :class:`DiskFullError` naming the entry (the caller removes ``tmp``)."""
        free = free_bytes(tmp)  # the entry needs more than this when the disk fills
        try:
            arrays = {n: np.asarray(a) for n, a in compute(tmp).items()}
            for n, a in arrays.items():
                np.save(tmp / f"{n}.npy", a)
            (tmp / "parts.json").write_text(json.dumps(parts, sort_keys=True, default=str, indent=1))
            record = {"arrays": sorted(arrays), "files": folder_records(tmp)}
            (tmp / ".done").write_text(json.dumps(record, sort_keys=True))
            return arrays
        except Exception as exc:
            if is_disk_full(exc) and not isinstance(exc, DiskFullError):
                raise DiskFullError(entry, at_least=max(bytes_in(tmp), free)) from exc
            raise

    @staticmethod
    def _load(entry: Path) -> tuple[str | None, dict[str, np.ndarray]]:
        """(None, the arrays) of a committed entry whose files are as its ``.done`` records them, else
        (what is wrong, {})."""
        record, problem = done_record(entry)
        problem = problem or folder_problem(entry, record["files"])
        if problem is not None:
            return problem, {}
        try:
            return None, {n: np.load(entry / f"{n}.npy", allow_pickle=False) for n in record["arrays"]}
        except (OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            return f"it cannot be read ({type(exc).__name__})", {}
