"""``python -m webapp``: the web page (:mod:`webapp.app`; also ``scripts/app.sh``)."""

from moditalker.errors import cli_main
from webapp.app import main

if __name__ == "__main__":
    cli_main(main)
