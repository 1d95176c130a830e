"""Resumable run folders shared by the MToV trainers (autoencoder and diffusion).

``<out_dir>/state`` holds the accelerate state plus ``trainer.json`` (step and trainer extras). It is
written to ``state.tmp`` and swapped in, so a crash at any moment leaves one valid copy
(``state`` or ``state.old``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import DataLoader

from data.device import is_main_rank
from data.errors import UserError


def infinite(loader: DataLoader) -> Iterator[dict]:
    """Cycle over ``loader`` forever (a new shuffle each pass); a pass with no batch is an error, not
    an endless loop."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("the training loader gave no batch; lower train.batch_size or add training data")


def save_state(accelerator, out_dir: Path, info: dict) -> None:
    """Save the accelerate state and ``info`` (JSON) atomically as ``out_dir/state``."""
    tmp, final, old = out_dir / "state.tmp", out_dir / "state", out_dir / "state.old"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before any rank writes its RNG state file into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files are in before the folder is renamed
    if accelerator.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps(info))
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def find_state(out_dir: Path) -> Path | None:
    """The newest complete state folder in ``out_dir``, or None."""
    for name in ("state", "state.old"):
        if (out_dir / name / "trainer.json").is_file():
            return out_dir / name
    return None


def read_state_info(state_dir: Path) -> dict:
    """The ``trainer.json`` saved with a state."""
    return json.loads((state_dir / "trainer.json").read_text())


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check ``out_dir`` for a new run or a resume; returns the state to resume from (or None).

    A folder that holds files but no resumable state is refused unless ``overwrite``; with
    ``overwrite`` and no resume, the previous state and metrics are removed.
    """
    state_dir = find_state(out_dir) if resume else None
    if out_dir.exists() and any(out_dir.iterdir()) and state_dir is None and not overwrite:
        raise UserError(
            f"output folder {out_dir} already holds files but no resumable state; "
            "pass --overwrite to start a new run there, or choose another out_dir"
        )
    if overwrite and not resume and out_dir.exists():
        for name in ("state", "state.old", "state.tmp", "metrics.jsonl"):
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return state_dir


def add_run_arguments(p: argparse.ArgumentParser, default_config: str) -> None:
    """The command-line options both MToV trainers share (see :func:`apply_run_arguments`)."""
    p.add_argument("--config", default=default_config, help="YAML config (OmegaConf)")
    p.add_argument("--out_dir", default=None, help="run folder (overrides out_dir in the config)")
    p.add_argument("--device", default=None, help="auto|cpu|cuda|cuda:N (overrides train.device)")
    p.add_argument("--no_resume", action="store_true", help="ignore {out_dir}/state (needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty out_dir")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
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
