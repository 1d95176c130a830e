"""The command-line options every trainer shares, and the rank-0 summary line."""

from __future__ import annotations

import argparse
import json

from moditalker.device import is_main_rank
from moditalker.errors import UserError


def add_run_arguments(p: argparse.ArgumentParser, default_config: str) -> None:
    """The command-line options both MToV trainers share (see :func:`apply_run_arguments`)."""
    p.add_argument("--config", default=default_config, help="YAML config (OmegaConf)")
    p.add_argument("--out_dir", default=None, help="run folder (overrides out_dir in the config)")
    p.add_argument("--device", default=None, help="auto|cpu|cuda|cuda:N (overrides train.device)")
    p.add_argument("--no_resume", action="store_true", help="ignore {out_dir}/state (needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty out_dir")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    p.add_argument("--check", action="store_true", help="read every training item and report; no training")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.max_steps=1000")


def apply_run_arguments(cfg, args: argparse.Namespace) -> None:
    """Write ``--out_dir`` / ``--device`` into ``cfg``; ``--no_resume`` needs ``--overwrite``."""
    if args.out_dir is not None:
        cfg.out_dir = args.out_dir
    if args.device is not None:
        cfg.train.device = args.device
    if args.no_resume and not args.overwrite:
        raise UserError("--no_resume restarts the run in place; add --overwrite to confirm")


def print_summary(summary: dict) -> None:
    """The trainer's one JSON result line, printed by rank 0 only."""
    if is_main_rank():
        print(json.dumps(summary))
