"""A cached stage written batch by batch, so that a killed run resumes where it stopped.

The MToV stage (:mod:`pipeline.stages.mtov`) keeps its output under the same key as any cached stage
(:class:`pipeline.cache.WorkCache`), but a batch at a time:

* ``<stage>-<key>.partial/batch-00000.npz, batch-00001.npz, ...``: the finished batches of a run
  still going (or killed), each written atomically (temp file + rename), with ``layout.json``;
* ``<stage>-<key>/``: the complete entry, the partial folder renamed once its last batch is written
  (with ``parts.json`` and ``.done``, as every entry).

A re-run of the same command finds the finished batches, uses them as they are and computes only the
rest; a batch file that was being written when the run was killed is a hidden temp file, removed.

Every batch's size and sha256 are recorded in ``batches.json`` as it is written (and in ``.done`` for
the whole entry); a batch that is missing, truncated or changed is found before it is used: a
``warning:`` line names it and it is computed again with the batches after it, which gives the frames
of a clean run. A batch written by a run killed before it could record it is checked by reading it
whole (the zip's CRCs) and recorded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moditalker.fileio import (
    atomic_path,
    atomic_write_text,
    file_record,
    folder_problem,
    folder_records,
    json_or_none,
    npz_problem,
    record_problem,
    remove_path,
)
from pipeline.cache import OLDER_LAYOUT, WorkCache, done_record, stable_key

__all__ = ["BatchStore"]


class BatchStore:
    """The batches of stage ``stage`` for cache-key ``parts`` in ``cache``'s folder."""

    RECORDS = "batches.json"  #: {batch file name: [size, sha256]} of the finished batches

    def __init__(
        self, cache: WorkCache, stage: str, parts: dict[str, Any], log: Callable[[str], None] = print
    ) -> None:
        self.stage, self.parts, self.log = stage, parts, log
        self.key = stable_key({"stage": stage, **parts})
        self.entry = cache.entry(stage, self.key)
        self.partial = self.entry.with_name(self.entry.name + ".partial")
        self.records: dict[str, list] = {}

    @property
    def complete(self) -> bool:
        return (self.entry / ".done").is_file()

    @property
    def folder(self) -> Path:
        """Where the batches are: the complete entry, else the partial folder."""
        return self.entry if self.complete else self.partial

    def path(self, index: int) -> Path:
        return self.folder / f"batch-{index:05d}.npz"

    def open(self, layout: dict[str, Any]) -> int:
        """Prepare the partial folder for a run with ``layout`` (batch geometry: a folder left by
        another layout is emptied) and return the number of finished batches (0, 1, ... in a row)."""
        if self.partial.exists() and not self.partial.is_dir():  # not ours: a folder is written here
            remove_path(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        manifest = self.partial / "layout.json"
        if manifest.exists() and json_or_none(manifest) != layout:  # another layout, or unreadable
            shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
        if not manifest.is_file():
            with atomic_path(manifest) as tmp:
                tmp.write_text(json.dumps(layout, sort_keys=True))
        for stale in self.partial.glob(".batch-*"):  # a write cut short by a kill
            stale.unlink(missing_ok=True)
        if (self.partial / self.RECORDS).is_dir():  # not ours: the records are written at that name
            shutil.rmtree(self.partial / self.RECORDS)
        self.records = self._read_records()
        done = 0
        while True:
            path, name = self.path(done), self.path(done).name
            if not path.is_file():
                if name in self.records:
                    self._warn(f"{name} is missing", done)
                break
            problem = record_problem(path, self.records[name]) if name in self.records else npz_problem(path)
            if problem is not None:
                self._warn(problem, done)
                for later in self.partial.glob("batch-*.npz"):  # they follow the damaged one: again
                    if later.name >= name:
                        later.unlink()
                break
            self.records.setdefault(name, file_record(path))  # written by a run killed before recording
            done += 1
        self.records = {k: v for k, v in self.records.items() if k < self.path(done).name}
        self._write_records()
        return done

    def _warn(self, problem: str, index: int) -> None:
        self.log(f"warning: {self.partial.name}: {problem}; computing it again from batch {index}")

    def _read_records(self) -> dict[str, list]:
        records = json_or_none(self.partial / self.RECORDS)
        return records if isinstance(records, dict) else {}

    def _write_records(self) -> None:
        atomic_write_text(self.partial / self.RECORDS, json.dumps(self.records, sort_keys=True))

    def problem(self) -> str | None:
        """What is wrong with the complete entry's files (None: all as recorded when it was finished)."""
        record, problem = done_record(self.entry)
        if problem == OLDER_LAYOUT:
            old = self.entry / "frames.npy"  # the layout before batches: kept when it reads back whole
            if old.is_file() and npz_problem(old, npy=True) is None:
                (self.entry / ".done").write_text(json.dumps({"files": folder_records(self.entry)}))
                return None
        return problem or folder_problem(self.entry, record["files"])

    def reopen(self, problem: str) -> None:
        """A complete entry with a damaged file goes back to being a partial folder (the next
        :meth:`open` finds the damaged batch and keeps the ones before it); the old single-file layout
        is removed."""
        self.log(
            f"warning: stage cache entry {self.entry.name}: {problem}; computing the damaged batches again"
        )
        if self.partial.exists():
            shutil.rmtree(self.partial)
        if (self.entry / "frames.npy").exists() or not (self.entry / "layout.json").is_file():
            shutil.rmtree(self.entry)
            return
        (self.entry / ".done").unlink()
        os.replace(self.entry, self.partial)

    def count(self) -> int:
        """The batches of the complete entry."""
        return len(list(self.entry.glob("batch-*.npz")))

    def save(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Batch ``index``, atomically: it exists whole or not at all."""
        path = self.partial / f"batch-{index:05d}.npz"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            record = file_record(tmp)
        self.records[path.name] = record
        self._write_records()

    def load(self, index: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Batch ``index``'s arrays (only ``names``, if given: the others are not read)."""
        with np.load(self.path(index), allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if names is None else names) if k in z.files}

    def finish(self) -> None:
        """Every batch is written: the partial folder becomes the stage's entry."""
        (self.partial / "parts.json").write_text(
            json.dumps(self.parts, sort_keys=True, default=str, indent=1)
        )
        (self.partial / ".done").write_text(json.dumps({"files": folder_records(self.partial)}))
        remove_path(self.entry)  # a stale, unfinished entry (an older layout), or a file not ours
        os.replace(self.partial, self.entry)
