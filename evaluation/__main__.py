from evaluation.evaluate import main
from moditalker.errors import cli_main

cli_main(main)
