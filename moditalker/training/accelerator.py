"""The trainers' accelerate set-up: one process group that matches the launcher, and training
loaders that cannot spin forever."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from moditalker.errors import UserError


def start_accelerator(name: str, device: torch.device | None = None, **kwargs):
    """An ``accelerate.Accelerator(**kwargs)`` for trainer ``name``, checked against the launcher.

    Several processes started by a launcher (``WORLD_SIZE`` > 1) that did not join one process group
    would each train alone and write the same run folder; that is refused here. ``device`` (the
    resolved ``train.device``): ``cuda:N`` in a single process makes GPU N the current device, which
    accelerate's ``cuda`` then means (it would otherwise take GPU 0); launched processes keep the GPU
    of their ``LOCAL_RANK``. Prints one line on the main process: how many processes, which
    distributed mode, which device.
    """
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if not torch.cuda.is_available():
        kwargs["cpu"] = True  # lets torchrun-launched CPU processes join one gloo group (MULTI_CPU)
    elif device is not None and device.type == "cuda" and device.index is not None and launched <= 1:
        torch.cuda.set_device(device)
    acc = Accelerator(**kwargs)
    if launched > 1 and acc.num_processes != launched:
        raise UserError(
            f"{launched} processes were launched but accelerate set up {acc.num_processes} "
            f"({acc.distributed_type}); launch with NUM_PROCESSES=N scripts/train_*.sh or "
            "`accelerate launch --multi_gpu --num_processes N`"
        )
    acc.print(f"{name}: {acc.num_processes} process(es), {acc.distributed_type}, device {acc.device}")
    return acc


def train_val_loaders(train_ds, val_ds, batch_size: int, num_workers: int, num_processes: int):
    """(training loader, validation loader) as the MToV trainers use them: the training one shuffled,
    dropping a last short batch only when every process still gets a full one. Its workers start anew
    each pass, seeded from the global generators then, so that a resumed run draws the windows of the
    run it continues (:class:`~moditalker.training.loop.PassBatches`); kept alive, they would carry
    their random states from pass to pass."""
    train = DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_ds) >= batch_size * num_processes,
        num_workers=num_workers,
    )
    return train, DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


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
