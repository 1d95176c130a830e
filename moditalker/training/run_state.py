"""Resumable run folders of the trainers (AToM, the MToV autoencoder and diffusion trainers).

``<out_dir>/state`` holds the accelerate state plus ``trainer.json`` (step and trainer extras). It is
written to ``state.tmp`` and swapped in, so a crash at any moment leaves one valid copy
(``state`` or ``state.old``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

from moditalker.errors import DiskFullError, UserError, bytes_in, free_bytes, is_disk_full
from moditalker.fileio import same_file


class _SharedTensorNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor ... while saving" warning: tensors that share one
    storage (AToM's rotary frequency tables) are saved once and come back into that one storage."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_SharedTensorNote())


def save_state(accelerator, out_dir: Path, info: dict) -> None:
    """Save the accelerate state and ``info`` (JSON) atomically as ``out_dir/state``."""
    tmp, final, old = out_dir / "state.tmp", out_dir / "state", out_dir / "state.old"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before any rank writes its RNG state file into it
    accelerator.wait_for_everyone()
    free = free_bytes(out_dir)  # the state needs more than this when the disk fills
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's files are in before the folder is renamed
        if accelerator.is_main_process:
            (tmp / "trainer.json").write_text(json.dumps(info))
    except Exception as exc:
        # torch.save to a path and safetensors report a full disk as a RuntimeError ("file write
        # failed", "os error 28"): a failed write with under 1 MB left on the device is one too
        if is_disk_full(exc) or ("write" in str(exc).lower() and free_bytes(out_dir) < 1 << 20):
            written = max(bytes_in(tmp), free)
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFullError(final, at_least=written) from exc
        raise
    if accelerator.is_main_process:
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


#: what a trainer writes in its run folder before its first state is saved
_FIRST_FILES = {
    "files": ("config.yaml", "metrics.jsonl", "model_last.pth", "model_best.pth"),
    "folders": ("tb",),
}


def _stopped_before_first_state(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds only what a trainer writes before its first state (its config, the
    first metrics and checkpoints, tensorboard events, a ``state.tmp`` cut short): a run of this
    trainer that stopped there, which the same command starts again."""
    if not (out_dir / "config.yaml").is_file():
        return False
    known = {*_FIRST_FILES["files"], *_FIRST_FILES["folders"], "state.tmp"}
    return all(p.name in known for p in out_dir.iterdir())


#: the model files and config a trainer writes into its out_dir
RUN_OUTPUTS = ("config.yaml", "model_last.pth", "model_best.pth", "diffusion_model.pth")


def check_inputs_are_not_outputs(out_dir: Path, inputs: Mapping[str, str | Path | None]) -> None:
    """UserError when one of ``inputs`` (``{setting: path}``: checkpoints the run starts from) is a
    file the run writes into ``out_dir`` (:data:`RUN_OUTPUTS`): an input is never an output (training
    the UNet into the autoencoder's folder would replace the autoencoder with the UNet)."""
    for name, given in inputs.items():
        for output in (Path(out_dir) / n for n in RUN_OUTPUTS if given not in (None, "")):
            if same_file(output, given):
                raise UserError(
                    f"{name}={given} is {output}, which this run writes; choose another out_dir "
                    "(or copy the file elsewhere first)"
                )


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check ``out_dir`` for a new run or a resume; returns the state to resume from (or None).

    A folder that holds files but no resumable state is refused unless ``overwrite``; with
    ``overwrite``, a run that starts anew there (no resume, or no state to resume) first removes the
    previous run's state, metrics, tensorboard logs and step checkpoints (``checkpoints/step_*.pt``;
    other files in ``checkpoints/`` stay). Its model files are replaced as the new run writes them (one
    may be the new run's ``init_from``).
    """
    state_dir = find_state(out_dir) if resume else None
    if resume and state_dir is None and _stopped_before_first_state(out_dir):
        print(
            f"note: {out_dir} holds a run that stopped before its first saved state (a crash or a full "
            "disk); starting it again",
            flush=True,
        )
        overwrite, resume = True, False
    if out_dir.exists() and any(out_dir.iterdir()) and state_dir is None and not overwrite:
        raise UserError(
            f"output folder {out_dir} already holds files but no resumable state; "
            "pass --overwrite to start a new run there, or choose another out_dir"
        )
    if overwrite and state_dir is None and out_dir.exists():
        for name in (
            "state",
            "state.old",
            "state.tmp",
            "metrics.jsonl",
            *_FIRST_FILES["folders"],
        ):
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        for p in (out_dir / "checkpoints").glob("step_*.pt"):
            p.unlink()
    return state_dir
