"""``python -m moditalker.training.launch [accelerate launch options] -m MODULE [args]``: ``accelerate
launch`` for the training scripts and the bulk jobs (``scripts/_bulk.sh``), with a one-line ending
when a process fails.

Each failing rank already prints its own one-line ``error: ...`` (``moditalker.errors.cli_main``); the
launcher's traceback (torchrun's ``ChildFailedError``) is replaced by one summary line, and the exit
status is the first failing rank's (2 for a bad input or missing asset).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        launch_command(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        if any(f.exitcode and f.exitcode > 0 for _, f in failures):
            # ranks the launcher itself stopped (SIGTERM) once another had failed are not failures
            failures = [(r, f) for r, f in failures if f.exitcode != -signal.SIGTERM] or failures
        ranks = ", ".join(str(rank) for rank, _ in failures)
        code = next((f.exitcode for _, f in failures if f.exitcode and f.exitcode > 0), 1)
        job = os.environ.get("MODITALKER_JOB")  # set by the bulk scripts (scripts/_bulk.sh)
        n = len(failures)
        if job:
            message = f"error: {job}: {n} process(es) ended with exit status {code} (rank {ranks})"
        else:
            message = f"error: training stopped: {n} process(es) failed (rank {ranks}, exit {code})"
        print(f"{message}; their messages are above", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
