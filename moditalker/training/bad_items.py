"""Unreadable training items: skipped, counted and named once, up to a limit.

A long run must not die on item 812,345 of a corpus (a truncated JPEG, a keypoint file of the wrong
shape, a damaged ``.npz``), nor silently train on a corpus that is mostly broken. Datasets are wrapped
in :class:`SkipUnreadable`: an item that cannot be read is replaced by the next readable one (so the
batch keeps its size) and reported with a ``warning:`` line naming it, once per worker; the item that
stands in carries the index of the skipped one under ``skipped_item``. The trainer feeds every batch
to a :class:`BadItems` counter, which stops the run with one line once more distinct items than
``data.max_bad_items`` were unreadable, and reports the count as ``skipped_items`` in its metrics.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from moditalker.errors import UserError, describe

#: What reading a damaged or malformed item raises (a bug in the code raises something else and stops).
READ_ERRORS = (UserError, OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


def allowed_bad_items(limit: float, total: int) -> int:
    """``data.max_bad_items`` as a count: a fraction of ``total`` when below 1, else a number of items."""
    if limit < 0:
        raise UserError(f"data.max_bad_items must be >= 0, got {limit}")
    return int(limit * total) if limit < 1 else int(limit)


def warn_unreadable(name: str, exc: BaseException) -> None:
    print(
        f"warning: skipped an unreadable training item {name}: {describe(exc)}", file=sys.stderr, flush=True
    )


class SkipUnreadable(Dataset):
    """``dataset`` whose unreadable items are replaced by the next readable one (see the module doc).

    ``name(i)`` names item ``i`` in messages (its file). Items are dicts; the returned one gains
    ``skipped_item``: the index of the first unreadable item it replaced, or -1.
    """

    def __init__(self, dataset: Dataset, name: Callable[[int], str]) -> None:
        self.dataset, self.name = dataset, name
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        first_bad = -1
        for k in range(n):
            i = (index + k) % n
            try:
                item = self.dataset[i]
            except READ_ERRORS as exc:
                if i not in self._warned:
                    self._warned.add(i)
                    warn_unreadable(self.name(i), exc)
                first_bad = i if first_bad < 0 else first_bad
                continue
            item["skipped_item"] = first_bad
            return item
        raise UserError(f"no training item could be read ({n} tried); see the warnings above")


class BadItems:
    """Distinct unreadable items seen by the trainer; stops the run past the allowed number."""

    def __init__(self, limit: float, total: int, name: Callable[[int], str]) -> None:
        self.allowed, self.limit, self.name = allowed_bad_items(limit, total), limit, name
        self.indices: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def add(self, index: int) -> None:
        self.indices.add(int(index))
        if len(self.indices) > self.allowed:
            first = ", ".join(self.name(i) for i in sorted(self.indices)[:3])
            raise UserError(
                f"{len(self.indices)} training items are unreadable, more than data.max_bad_items="
                f"{self.limit} allows ({self.allowed}); first: {first}; fix or remove them "
                "(--check lists every one)"
            )

    def note_batch(self, batch: dict) -> None:
        """Count the items a batch's stand-ins replaced (its ``skipped_item`` entries)."""
        skipped = batch.get("skipped_item")
        if skipped is None:
            return
        for index in torch.as_tensor(skipped).reshape(-1).tolist():
            if index >= 0:
                self.add(index)


def check_items(dataset: Dataset, name: Callable[[int], str], progress: bool = True) -> list[str]:
    """Read every item of ``dataset`` (no training); returns one line per unreadable item."""
    from tqdm.auto import tqdm

    bad = []
    for i in tqdm(range(len(dataset)), desc="checking items", disable=not progress):
        try:
            dataset[i]
        except READ_ERRORS as exc:
            bad.append(f"{name(i)}: {describe(exc)}")
    return bad
