"""The one exception type for errors a user can cause, and the CLI wrapper that prints it.

Every loader and CLI raises :class:`UserError` for a missing file, a bad shape, no face, audio too
short, a mismatched checkpoint, ...: the message names the file and the fix. ``cli_main`` turns it
into one line on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class UserError(Exception):
    """An error caused by the user's inputs, files or settings (printed without a traceback)."""


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


def cli_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors (two exclusive flags, a missing required flag, a
    value of the wrong type) are a :class:`UserError`: one ``error:`` line and exit 2 under
    :func:`cli_main`, instead of the usage block; ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")
