"""Resumable run folders of the trainers (AToM, the MToV autoencoder and diffusion trainers).

``<out_dir>/state`` holds the accelerate state plus ``trainer.json`` (step and trainer extras). It is
written to ``state.tmp`` and swapped in, so a crash at any moment leaves one valid copy
(``state`` or ``state.old``).

A damaged state (a truncated or overwritten file, a ``trainer.json`` of the wrong shape) is never a
traceback: :func:`load_state` falls back to ``state.old`` when a save cut short left one that loads
(with a ``warning:`` line), else stops with one line naming the folder and the way out.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from moditalker.errors import DiskFullError, UserError, bytes_in, describe, free_bytes, is_disk_full
from moditalker.fileio import is_count, same_file


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
        if final.exists() and old.exists():  # left by a save cut short; ``final`` is the state in use
            shutil.rmtree(old)
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
    """The ``trainer.json`` saved with a state, checked: an object with ``step`` (an integer >= 0),
    ``bad_items`` (integers >= 0) and ``position`` (``{"epoch", "batch"}``, integers >= 0) when
    present. Anything else is a ``ValueError`` saying what is wrong."""
    path = state_dir / "trainer.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8
        raise ValueError(f"trainer.json cannot be read ({describe(exc)})") from exc
    if not isinstance(info, dict):
        raise ValueError(f"trainer.json holds a {type(info).__name__}, not an object")
    if not is_count(info.get("step")):
        raise ValueError(f"trainer.json's step is {info.get('step')!r}, not an integer >= 0")
    bad = info.get("bad_items", [])
    if not isinstance(bad, list) or not all(is_count(i) for i in bad):
        raise ValueError(f"trainer.json's bad_items is {bad!r:.60}, not a list of integers >= 0")
    position = info.get("position")
    if position is not None and not (
        isinstance(position, dict) and all(is_count(position.get(k, 0)) for k in ("epoch", "batch"))
    ):
        raise ValueError(f"trainer.json's position is {position!r:.60}, not {{epoch, batch}} integers >= 0")
    return info


class _StateProblem(Exception):
    """Why a state folder cannot be resumed from (one line)."""


def _damaged_files(state_dir: Path) -> list[str]:
    """The files of ``state_dir`` that are visibly damaged (empty, a folder, a safetensors header or a
    torch zip archive that does not read), each as ``"<name> <what>"``."""
    from safetensors import safe_open

    out = []
    for path in sorted(state_dir.iterdir()):
        if path.name == "trainer.json":
            continue
        if path.is_dir():
            out.append(f"{path.name} is a folder")
        elif path.stat().st_size == 0:
            out.append(f"{path.name} is empty")
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt") as f:
                    f.keys()
            except Exception as exc:  # noqa: BLE001 - any failure: a damaged file
                out.append(f"{path.name} is damaged ({describe(exc)[:80]})")
        elif path.suffix in (".bin", ".pkl"):  # torch.save archives
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (OSError, zipfile.BadZipFile) as exc:
                out.append(f"{path.name} is damaged ({describe(exc)[:80]})")
            else:
                if bad is not None:
                    out.append(f"{path.name} is damaged (a bad checksum in {bad})")
    return out


def _rng_problem(state_dir: Path, process_index: int) -> str:
    """Why this process's RNG states were not restored from ``state_dir`` ("" when they were):
    accelerate's ``load_state`` only logs (at info level) a ``random_states_<i>.pkl`` it cannot
    load, so the states now set are compared with the file's."""
    from accelerate.utils import load

    path = state_dir / f"random_states_{process_index}.pkl"
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        states = load(path)
        restored = (
            random.getstate() == tuple(states["random_state"])
            and np.array_equal(np.random.get_state()[1], states["numpy_random_seed"][1])
            and torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
        )
        if torch.cuda.is_available():
            if "torch_cuda_manual_seed" not in states:
                return f"{path.name} holds no CUDA states (saved on a machine without a GPU?)"
            saved = states["torch_cuda_manual_seed"]
            now = torch.cuda.get_rng_state_all()
            restored = restored and len(saved) == len(now) and all(map(torch.equal, saved, now))
    except Exception as exc:  # noqa: BLE001 - any failure: a damaged file
        return f"{path.name} cannot be read ({describe(exc)[:80]})"
    return "" if restored else f"the states of {path.name} were not restored (another device or GPU count?)"


#: the outcome of loading one state folder: loaded exactly, loaded but RNG states lost, not loaded
_EXACT, _NO_RNG, _DAMAGED = 0, 1, 2


def _try_load(accelerator, state_dir: Path) -> tuple[int, str, dict]:
    """Load ``state_dir`` into the prepared objects (every rank): ``(outcome, problem, trainer.json)``,
    the outcome agreed by every process (the worst of theirs)."""
    problem, info, outcome = "", {}, _EXACT
    try:
        info = read_state_info(state_dir)
        try:
            accelerator.load_state(str(state_dir))
        except (KeyboardInterrupt, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to load: a damaged or foreign state
            damaged = ", ".join(_damaged_files(state_dir))
            text = " ".join(str(exc).split())[:240] or type(exc).__name__  # torch's errors span lines
            raise _StateProblem(damaged or f"{text} (a state of another config?)") from exc
        problem = _rng_problem(state_dir, accelerator.process_index)
        outcome = _NO_RNG if problem else _EXACT
    except (ValueError, _StateProblem) as exc:
        problem, outcome = str(exc), _DAMAGED
    if accelerator.num_processes > 1:
        agreed = int(accelerator.gather(torch.tensor([outcome], device=accelerator.device)).max())
        if agreed != outcome:  # this process loaded more than another one did
            problem = problem or (
                "another process's random_states_<rank>.pkl did not load"
                if agreed == _NO_RNG
                else "another process could not load it"
            )
        outcome = agreed
    return outcome, problem, info


def _warn(accelerator, text: str) -> None:
    if accelerator.is_main_process:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def load_state(accelerator, out_dir: Path, state_dir: Path) -> tuple[Path, dict]:
    """Load the state of :func:`find_state` (after ``accelerator.prepare`` and
    ``register_for_checkpointing``; every rank); returns ``(the folder loaded, its trainer.json)``.

    A state that does not load (a damaged ``trainer.json``, model, optimizer, registered object) falls
    back to ``state.old`` when that is there and loads: a ``warning:`` line says so, and the damaged
    folder is kept as ``state.damaged``. ``state.old`` is the previous save, left only by a save cut
    short (a finished save removes it), so usually there is none: the run stops with one line naming
    the folder; ``--no_resume --overwrite`` starts the run again, and AToM, which also keeps step
    checkpoints, resumes from the newest of them once the state folders are moved away.

    A resume is exact only with every process's RNG states (``random_states_<i>.pkl``), which
    accelerate skips with an info-level log when it cannot read them. A state that lost them counts as
    damaged when ``state.old`` loads with them (an exact resume ``save_every`` steps earlier is taken
    over an inexact one); when nothing better is there the run resumes from it, with a ``warning:``
    line that it will not repeat an uninterrupted run bit for bit (the weights, optimizer and step are
    intact: the data order still is that of the saved position, only the random draws differ).
    """
    candidates = [state_dir]
    old = out_dir / "state.old"
    if state_dir != old and (old / "trainer.json").is_file():
        candidates.append(old)
    results = []
    for candidate in candidates:
        results.append((candidate, *_try_load(accelerator, candidate)))
        if results[-1][1] == _EXACT:
            break
    usable = [r for r in results if r[1] != _DAMAGED]
    if not usable:
        raise UserError(_no_state_message(out_dir, results))
    chosen, outcome, problem, info = min(usable, key=lambda r: r[1])  # exact first, then the newest
    if chosen != results[-1][0]:  # another folder was loaded after it
        accelerator.load_state(str(chosen))
    newest, damaged = out_dir / "state", out_dir / "state.damaged"
    if chosen == old and newest.exists():
        why = results[0][2] if results[0][0] == newest else "it has no trainer.json"
        _warn(
            accelerator,
            f"cannot resume from {newest}: {why}; resuming from {old} (the previous save) instead; "
            f"the damaged folder is kept as {damaged}",
        )
        accelerator.wait_for_everyone()  # every rank has loaded before the folder moves
        if accelerator.is_main_process:
            if damaged.exists():
                shutil.rmtree(damaged)
            newest.rename(damaged)
        accelerator.wait_for_everyone()
    if outcome == _NO_RNG:
        _warn(
            accelerator,
            f"the random-number states in {chosen} did not load ({problem}): the run resumes with the "
            "saved weights, optimizer and step but will not repeat an uninterrupted run bit for bit",
        )
    return chosen, info


def _no_state_message(out_dir: Path, results: list) -> str:
    """The one line when no state of ``out_dir`` loads: what is wrong with each, and the way out
    (moving the folders away is offered only where the trainer then resumes from something else: AToM's
    step checkpoints; elsewhere it would start the run again over its metrics and weights)."""
    whats = " nor from ".join(f"{path} ({problem})" for path, _, problem, _ in results)
    paths = " and ".join(str(path) for path, *_ in results)
    way_out = "rerun with --no_resume --overwrite to start the run again"
    if (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").glob("step_*.pt")):
        way_out += f", or move {paths} away to resume from the newest checkpoints/step_*.pt"
    return f"cannot resume from {whats}; {way_out}"


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
            "state.damaged",
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
