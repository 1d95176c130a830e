"""Bulk jobs (preprocessing, ``--batch_file`` renders, evaluation protocols) on several processes.

Every bulk command runs the same way on one process, on several processes started by the training
launcher (``NUM_PROCESSES=N scripts/...``: torchrun through ``accelerate launch``, which sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or as independent jobs without a rendezvous
(``--shard K --num_shards N``, e.g. a Slurm array), or both (each of the N jobs launched with
NUM_PROCESSES=P: N*P ranks in all).

* Each rank takes a deterministic share of the sorted item list (:meth:`Ranks.share`: every
  ``world``-th item starting at its rank), so the outputs do not depend on how many processes made them.
* Each rank works on its own device (:meth:`Ranks.device`: ``cuda:LOCAL_RANK`` for ``auto``/``cuda``
  under the launcher, the CPU where there is no GPU) with its own networks, loaded once.
* Launched ranks join one gloo process group, used only to gather small Python objects (the failed
  items, per-video metric records) on rank 0 at the end: :meth:`Ranks.gather`, :meth:`Ranks.finish`.
  Independent shards cannot talk to each other; each reports its own failures.
* Every rank logs with its name (:meth:`Ranks.log`: ``[rank 1/2] ...``) and shows its own progress
  bar (:meth:`Ranks.bar`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from moditalker.errors import UserError

__all__ = ["Ranks", "start", "check_shard"]

T = TypeVar("T")

#: how long rank 0 waits for the slowest rank at the end (its share can take hours)
GATHER_TIMEOUT = timedelta(days=7)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError as exc:
        raise UserError(f"{name}={value!r} in the environment is not a whole number") from exc


def check_shard(shard: int, num_shards: int) -> None:
    """``--shard K --num_shards N``: N >= 1 and 0 <= K < N, else a UserError."""
    if num_shards < 1:
        raise UserError(f"--num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise UserError(
            f"--shard must be in 0..{num_shards - 1} (got {shard} with --num_shards {num_shards})"
        )


@dataclass
class Ranks:
    """This process's place in a bulk job: ``rank`` of ``world`` (shards x launched processes)."""

    rank: int = 0  # among every process of every shard: shard * group_size + group_rank
    world: int = 1
    local_rank: int = 0  # on this machine (the GPU index)
    group_rank: int = 0  # in the launched process group (the processes that can gather)
    group_size: int = 1
    shard: int = 0
    num_shards: int = 1
    _owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """Several launched processes in one process group."""
        return self.group_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of the process group: it gathers, prints the summary and writes shared results."""
        return self.group_rank == 0

    @property
    def name(self) -> str:
        """``rank R/W`` (empty for a single process)."""
        return f"rank {self.rank}/{self.world}" if self.world > 1 else ""

    def share(self, items: Iterable[T], key: Callable[[T], Any] | None = None) -> list[T]:
        """This rank's items: every ``world``-th of the sorted list, starting at ``rank``."""
        return sorted(items, key=key)[self.rank :: self.world]

    def own_folder(self, folder: str | None) -> str | None:
        """A work folder several ranks were given to share, made this rank's own (``FOLDER/rank-R``), so
        no two processes compute into one stage-cache entry at once; as given with one process."""
        return folder if folder is None or self.world == 1 else os.path.join(folder, f"rank-{self.rank}")

    def device(self, requested: str = "auto") -> str:
        """``auto`` / ``cuda`` -> ``cuda:LOCAL_RANK`` under the launcher on a machine with GPUs; any
        other request (``cpu``, ``cuda:N``) as given; ``auto`` without a GPU stays ``auto`` (CPU)."""
        import torch

        spec = (requested or "auto").strip().lower()
        if spec in ("auto", "cuda") and self.distributed and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def log(self, message: str, file=None) -> None:
        """Print ``message`` with this rank's name in front (nothing in front for a single process)."""
        prefix = f"[{self.name}] " if self.name else ""
        print(prefix + message, file=file or sys.stdout, flush=True)

    def bar(self, iterable=None, *, desc: str, disable: bool = False, **kwargs):
        """A tqdm bar named after this rank (one line per rank on this machine)."""
        from tqdm import tqdm

        label = f"{desc} [{self.name}]" if self.name else desc
        position = self.local_rank if self.distributed else None
        return tqdm(iterable, desc=label, disable=disable, position=position, **kwargs)

    def gather(self, obj: T) -> list[T] | None:
        """Every group rank's ``obj`` on rank 0 (in rank order), None on the others."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list | None = [None] * self.group_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: T) -> list[T]:
        """Every group rank's ``obj`` on every rank (in rank order)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.group_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def finish(
        self,
        failed: dict[str, str],
        *,
        total: int,
        what: str,
        message: Callable[[list[str]], str] | None = None,
    ) -> None:
        """The end of a bulk run: rank 0 gathers every rank's failed items (``{item: message}``),
        prints one line per failed item and raises one :class:`UserError` naming them (exit 2);
        ``message(names)`` words it (default: "N of TOTAL WHAT failed: ..."). The other ranks
        return. A single process or an independent shard reports its own failures."""
        gathered = self.gather({k: (self.rank, v) for k, v in failed.items()})
        if gathered is None:
            return
        merged: dict[str, tuple[int, str]] = {}
        for part in gathered:
            merged.update(part)
        if not merged:
            return
        names = sorted(merged, key=_natural)
        if len(names) == 1 and message is None:  # one line says it all
            rank, text = merged[names[0]]
            where = f" (rank {rank})" if self.world > 1 else ""
            raise UserError(
                f"1 of {total} {what} failed: {names[0]}{where}: {text}; the others are done "
                "(a rerun of the same command retries it)"
            )
        for item in names:
            rank, text = merged[item]
            where = f" (rank {rank})" if self.world > 1 else ""
            print(f"failed: {item}{where}: {text}", file=sys.stderr, flush=True)
        if message is not None:
            raise UserError(message(names))
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        scope = f" on shard {self.shard}/{self.num_shards}" if self.num_shards > 1 else ""
        rest = "the others are done" if len(names) < total else "none is done"
        raise UserError(
            f"{len(names)} of {total} {what} failed{scope}: {shown}; {rest} "
            "(a rerun of the same command retries only the failed ones)"
        )

    def close(self) -> None:
        """Leave the process group (when this object joined it)."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False


def _natural(text: str) -> list:
    """Sort key that puts "line 9" before "line 10"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def start(shard: int = 0, num_shards: int = 1) -> Ranks:
    """This process's :class:`Ranks`: ``--shard K --num_shards N`` and the launcher's ``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``; joins the gloo process group when several processes were launched."""
    check_shard(shard, num_shards)
    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank} and WORLD_SIZE={size} in the environment do not fit together")
    owns = False
    if size > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:
                raise UserError(
                    f"WORLD_SIZE={size} but no MASTER_ADDR: start several processes with the launcher "
                    "(NUM_PROCESSES=N scripts/...), or use --shard K --num_shards N for independent jobs"
                )
            dist.init_process_group("gloo", rank=rank, world_size=size, timeout=GATHER_TIMEOUT)
            owns = True
        if torch.cuda.is_available():
            torch.cuda.set_device(local % torch.cuda.device_count())
    return Ranks(
        rank=shard * size + rank,
        world=num_shards * size,
        local_rank=local,
        group_rank=rank,
        group_size=size,
        shard=shard,
        num_shards=num_shards,
        _owns_group=owns,
    )


def add_shard_args(parser, what: str = "items") -> None:
    """``--shard K --num_shards N`` on a bulk command's parser."""
    parser.add_argument(
        "--shard", type=int, default=0, help=f"this independent job's share of the {what} (0-based) [0]"
    )
    parser.add_argument(
        "--num_shards",
        type=int,
        default=1,
        help=f"independent jobs (no rendezvous, e.g. a Slurm array) sharing the {what} [1]",
    )
