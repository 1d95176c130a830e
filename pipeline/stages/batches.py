"""A cached stage written batch by batch, so that a killed run resumes where it stopped.

The MToV stage (:mod:`pipeline.stages.mtov`) keeps its output under the same key as any cached stage
(:class:`pipeline.cache.WorkCache`), but a batch at a time:

* ``<stage>-<key>.partial/batch-00000.npz, batch-00001.npz, ...``: the finished batches of a run
  still going (or killed), each written atomically (temp file + rename), with ``layout.json``;
* ``<stage>-<key>/``: the complete entry, the partial folder renamed once its last batch is written
  (with ``parts.json`` and ``.done``, as every entry).

A re-run of the same command finds the finished batches, uses them as they are and computes only the
rest; a batch file that was being written when the run was killed is a hidden temp file, removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from moditalker.fileio import atomic_path
from pipeline.cache import WorkCache, stable_key

__all__ = ["BatchStore"]


class BatchStore:
    """The batches of stage ``stage`` for cache-key ``parts`` in ``cache``'s folder."""

    def __init__(self, cache: WorkCache, stage: str, parts: dict[str, Any]) -> None:
        self.stage, self.parts = stage, parts
        self.key = stable_key({"stage": stage, **parts})
        self.entry = cache.entry(stage, self.key)
        self.partial = self.entry.with_name(self.entry.name + ".partial")

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
        self.partial.mkdir(parents=True, exist_ok=True)
        manifest = self.partial / "layout.json"
        if manifest.is_file() and json.loads(manifest.read_text()) != layout:
            shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
        if not manifest.is_file():
            with atomic_path(manifest) as tmp:
                tmp.write_text(json.dumps(layout, sort_keys=True))
        for stale in self.partial.glob(".batch-*"):  # a write cut short by a kill
            stale.unlink(missing_ok=True)
        done = 0
        while self.path(done).is_file():
            done += 1
        return done

    def count(self) -> int:
        """The batches of the complete entry."""
        return len(list(self.entry.glob("batch-*.npz")))

    def save(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Batch ``index``, atomically: it exists whole or not at all."""
        with atomic_path(self.partial / f"batch-{index:05d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def load(self, index: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Batch ``index``'s arrays (only ``names``, if given: the others are not read)."""
        with np.load(self.path(index), allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if names is None else names) if k in z.files}

    def finish(self) -> None:
        """Every batch is written: the partial folder becomes the stage's entry."""
        (self.partial / "parts.json").write_text(
            json.dumps(self.parts, sort_keys=True, default=str, indent=1)
        )
        (self.partial / ".done").write_text("[]")
        if self.entry.exists():  # a stale, unfinished entry from an older layout
            shutil.rmtree(self.entry)
        os.replace(self.partial, self.entry)
