"""Device selection, the only place that names CUDA (``--device auto|cpu|cuda|cuda:N``), and the
trainers' accelerate set-up checks."""

from __future__ import annotations

import os

import torch

from data.errors import UserError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``; ``auto`` picks CUDA when present."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' requested but MPS is not available; use --device cpu")
    return device


def start_accelerator(name: str, **kwargs):
    """An ``accelerate.Accelerator(**kwargs)`` for trainer ``name``, checked against the launcher.

    Several processes started by a launcher (``WORLD_SIZE`` > 1) that did not join one process group
    would each train alone and write the same run folder; that is refused here. Prints one line on
    the main process: how many processes, which distributed mode, which device.
    """
    from accelerate import Accelerator

    if not torch.cuda.is_available():
        kwargs["cpu"] = True  # lets torchrun-launched CPU processes join one gloo group (MULTI_CPU)
    acc = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and acc.num_processes != launched:
        raise UserError(
            f"{launched} processes were launched but accelerate set up {acc.num_processes} "
            f"({acc.distributed_type}); launch with NUM_PROCESSES=N scripts/train_*.sh or "
            "`accelerate launch --multi_gpu --num_processes N`"
        )
    acc.print(f"{name}: {acc.num_processes} process(es), {acc.distributed_type}, device {acc.device}")
    return acc


def check_train_loader(
    loader, n_items: int, batch_size: int, num_processes: int, what: str = "items"
) -> None:
    """Refuse a (prepared, sharded) training loader with no batch on this process, naming the sizes:
    a trainer cycling over it would otherwise loop forever."""
    if len(loader) == 0:
        raise UserError(
            f"{n_items} training {what} are too few for train.batch_size={batch_size} on "
            f"{num_processes} process(es); lower train.batch_size or add training data"
        )


def is_main_rank() -> bool:
    """True in a single process and in rank 0 of a launched group (``RANK`` from torchrun)."""
    return int(os.environ.get("RANK", "0") or 0) == 0
