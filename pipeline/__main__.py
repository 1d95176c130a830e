"""``python -m pipeline``: the pipeline's command line (:mod:`pipeline.cli`)."""

import os

from moditalker.errors import cli_main
from pipeline.cli import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_main(main)
