"""What the benchmark command lines share."""

from __future__ import annotations

from moditalker.errors import UserError

__all__ = ["set_threads"]


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads for this process (None: torch's default); >= 1 or a UserError."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
