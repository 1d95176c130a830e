"""The one exception type for errors a user can cause, and the CLI wrapper that prints it.

Every loader and CLI raises :class:`UserError` for a missing file, a bad shape, no face, audio too
short, a mismatched checkpoint, ...: the message names the file and the fix. ``cli_main`` turns it
into one line on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn


class UserError(Exception):
    """An error caused by the user's inputs, files or settings (printed without a traceback)."""


#: the errors of a full disk (and of a full quota, which looks the same to the user)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _mb(n: float) -> int:
    return max(1, math.ceil(n / 1e6))


class DiskFullError(UserError):
    """No space left on the device while writing ``path``: ``error: no space left on device while
    writing PATH (needs about N MB)``. ``needs``: the bytes the write needs, when known (a check before
    the work starts); else ``at_least``: a lower bound (what was written, or free, when the disk filled).
    """

    def __init__(
        self, path: str | os.PathLike, needs: float | None = None, at_least: float | None = None,
        free: float | None = None,
    ) -> None:  # fmt: skip
        if needs is not None:
            size = f"needs about {_mb(needs)} MB"
        elif at_least:
            size = f"needs more than {_mb(at_least)} MB"
        else:
            size = "needs more space than is free"
        size += f", {_mb(free) if free else 0} MB free" if free is not None else ""
        self.path = path
        super().__init__(f"no space left on device while writing {path} ({size})")


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the device of ``folder`` (its nearest existing ancestor)."""
    existing = next((p for p in (folder, *_parents(folder)) if os.path.isdir(p)), ".")
    return shutil.disk_usage(existing).free


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an ``OSError`` of a full disk."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):  # safetensors, C++ writers
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def disk_full_as(
    path: str | os.PathLike,
    at_least: Callable[[], float] = lambda: 0,
    cleanup: Callable[[], object] = lambda: None,
) -> Iterator[None]:
    """Inside, a full disk is a :class:`DiskFullError` naming ``path`` (``at_least()``: bytes written
    when it filled), after ``cleanup()`` (removing the temp file)."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc) or isinstance(exc, DiskFullError):
            raise
        written = at_least()
        cleanup()
        raise DiskFullError(path, at_least=written) from exc


def bytes_in(path: str | os.PathLike | None) -> int:
    """Bytes in a file, or in all files under a folder (0 when it is not there)."""
    if path is None or not os.path.lexists(path):
        return 0
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def check_space(folder: str | os.PathLike, needs: float, path: str | os.PathLike | None = None) -> None:
    """Raise :class:`DiskFullError` before a write of about ``needs`` bytes into ``folder`` (its
    nearest existing ancestor) when the device has less free space than that."""
    free = free_bytes(folder)
    if free < needs:
        raise DiskFullError(path or folder, needs=needs, free=free)


def _parents(folder: str | os.PathLike) -> list[str]:
    out, cur = [], os.path.abspath(folder)
    while True:
        parent = os.path.dirname(cur)
        if parent == cur:
            return out
        out.append(parent)
        cur = parent


def describe(exc: BaseException) -> str:
    """``exc`` in one line for a :class:`UserError` message: its first non-empty line, or its type's
    name when it has no text (``EOFError()`` of an empty file). Library errors often span several lines
    (torch.load's weights-only advice, transformers' offline hints), which would break the one-line rule.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def fail(message: str) -> NoReturn:
    """Raise a :class:`UserError` with ``message``."""
    raise UserError(message)


def _exit(code: int) -> NoReturn:
    """``sys.exit(code)``; a rank of a bulk job launched as several processes (``scripts/_bulk.sh``
    sets ``MODITALKER_JOB``; the launcher ``WORLD_SIZE``) leaves with ``os._exit`` once its output is
    flushed: its work is written and its process group left by then, and the C++ teardown that follows
    (gloo's threads) aborted such a rank now and then ("terminate called without an active exception",
    SIGABRT: about 1 rerun in 7 of a 2-rank CPU preprocessing), which the launcher reported as a failed
    run."""
    if _bulk_rank():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def cli_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit 2, and so does
    an ``OSError`` of a full disk (ENOSPC, EDQUOT) that no writer turned into a :class:`DiskFullError`."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _exit(2)
    except Exception as exc:  # a full disk anywhere a writer did not name its file: still one line
        if not is_disk_full(exc):
            raise
        full = exc if isinstance(exc, OSError) and exc.errno in NO_SPACE else exc.__cause__ or exc.__context__
        print(f"error: {DiskFullError(getattr(full, 'filename', None) or 'an output file')}", file=sys.stderr)
        _exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit(130)
    if _bulk_rank():  # a bulk job's rank that finished: see _exit
        _exit(0)


def _bulk_rank() -> bool:
    """Whether this process is one of several ranks of a bulk job (``scripts/_bulk.sh``)."""
    return bool(os.environ.get("MODITALKER_JOB")) and os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def script_prog(default: str) -> str:
    """The command name for a usage line: the ``scripts/*.sh`` launcher the user ran (``MODITALKER_PROG``,
    which the launchers set), else ``default`` (``python -m MODULE``)."""
    return os.environ.get("MODITALKER_PROG") or default


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors (two exclusive flags, a missing required flag, a
    value of the wrong type) are a :class:`UserError`: one ``error:`` line and exit 2 under
    :func:`cli_main`, instead of the usage block; ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")
