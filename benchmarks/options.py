"""What the benchmark command lines share."""

from __future__ import annotations

import argparse
import json
from typing import Any

from moditalker.errors import UserError
from moditalker.fileio import atomic_write_text, check_output

__all__ = ["check_common", "set_threads", "write_report"]


def check_common(args: argparse.Namespace) -> None:
    """Before any work: ``args.json`` may be written (absent, or ``args.overwrite``) and ``args.threads``
    is set (:func:`set_threads`)."""
    if args.json:
        check_output(args.json, args.overwrite)
    set_threads(args.threads)


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads for this process (None: torch's default); >= 1 or a UserError."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def write_report(path: str | None, report: dict[str, Any], indent: int = 1) -> None:
    """``--json``: the report as JSON (the file complete or absent); nothing when ``path`` is None."""
    if path:
        atomic_write_text(path, json.dumps(report, indent=indent) + "\n")
