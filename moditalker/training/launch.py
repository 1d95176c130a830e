"""``python -m moditalker.training.launch [accelerate launch options] -m MODULE [args]``: ``accelerate
launch`` for the training scripts, with a one-line ending when a process fails.

Each failing rank already prints its own one-line ``error: ...`` (``moditalker.errors.cli_main``); the
launcher's traceback (torchrun's ``ChildFailedError``) is replaced by one summary line, and the exit
status is the first failing rank's (2 for a bad input or missing asset).
"""

from __future__ import annotations

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
        ranks = ", ".join(str(rank) for rank, _ in failures)
        code = next((f.exitcode for _, f in failures if f.exitcode and f.exitcode > 0), 1)
        print(
            f"error: training stopped: {len(failures)} process(es) failed (rank {ranks}, exit {code}); "
            "their messages are above",
            file=sys.stderr,
        )
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
