"""The trainers' common skeleton: one run folder and one step loop.

A trainer builds its models, optimizers and loaders, prepares them with ``accelerate`` and registers
whatever else must come back on resume (an EMA) with ``accelerator.register_for_checkpointing``;
everything else is here:

* :class:`TrainingRun` owns ``<out_dir>``: the new-run / resume / ``--overwrite`` rules
  (:func:`~moditalker.training.run_state.prepare_run_dir`), the accelerate state in ``state/`` (model,
  optimizers, grad scaler, registered objects, every process's Python / NumPy / torch / CUDA RNG
  states, and ``trainer.json`` with the step, the unreadable items met so far and the trainer's
  extras; a damaged state falls back to ``state.old`` or stops with one line:
  :func:`~moditalker.training.run_state.load_state`), the resolved
  ``config.yaml``, tensorboard (``tb/``) and ``metrics.jsonl``;
* :func:`check_finite_loss`: a training loss that is NaN or infinite stops the run with one line;
* :meth:`TrainingRun.loop` runs the trainer's step function to ``max_steps`` with a progress bar:
  the step-0 baseline validation of a new run, the training scalars averaged over ``log_every``
  steps, validation every ``val_every`` steps, the saved state every ``save_every`` steps (and at
  the last step), the count of unreadable items skipped so far (``skipped_items``);
* :class:`PassBatches` is the MToV trainers' endless batch stream, resumed exactly in the middle of
  a pass (their datasets draw random windows from the global generators);
* :class:`EpochBatches` is AToM's exact-resume batch stream: each epoch seeded from (seed, epoch), a
  resumed run passes over the batches of its epoch already trained and then continues with the RNG
  states of the moment the state was saved; with several processes every rank shuffles alike and
  then draws its own noise.

Only rank 0 writes ``config.yaml``, ``tb/`` and ``metrics.jsonl``; every rank takes part in saving
and loading the state.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from moditalker.config import save_config
from moditalker.errors import UserError
from moditalker.fileio import is_count
from moditalker.training.bad_items import BadItems
from moditalker.training.rng import (
    derived_seed,
    rng_from_json,
    rng_state,
    rng_to_json,
    seed_everything,
    set_rng_state,
)
from moditalker.training.run_state import load_state, prepare_run_dir, save_state

#: a trainer's step: called with the 0-based index of the step it runs; returns the values to log
#: (floats), averaged over the ``log_every`` window as ``train/<name>``
StepFn = Callable[[int], dict]
#: a trainer's validation: called with the step; returns the record (``{"val_<name>": value}``) on the
#: rank that reports it, None on the others
ValidateFn = Callable[[int], "dict | None"]


def check_finite_loss(loss: float, step: int, hint: str = "lower train.lr") -> None:
    """Stop the run with one :class:`UserError` line when the training ``loss`` of ``step`` is NaN or
    infinite: it would otherwise train on to NaN weights and records, and exit 0."""
    if not math.isfinite(loss):
        raise UserError(f"training loss became {loss} at step {step}; {hint}")


class TrainingRun:
    """One run folder (see the module doc). Create it before the accelerator: whether it resumes
    decides what the trainer initialises (e.g. no warm start when a state is there).

    ``resume_from_file``: the trainer resumes from a checkpoint file of its own (an older run-folder
    layout, or a path it was given); the folder's state is not looked at and not refused.
    """

    def __init__(
        self,
        out_dir: str | Path,
        resume: bool = True,
        overwrite: bool = False,
        resume_from_file: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.state_dir = None if resume_from_file else prepare_run_dir(self.out_dir, resume, overwrite)
        self.step = 0
        self.info: dict = {}  # trainer.json of the state resumed from
        self.resumed_rng: dict | None = None  # the RNG states when that state was saved
        self.history: list[dict] = []  # the validation records of this process's run
        self.accelerator = None
        self.bad_items: BadItems | None = None
        self.writer = None

    @property
    def resuming(self) -> bool:
        return self.state_dir is not None or self.step > 0

    def open(self, accelerator, cfg, bad_items: BadItems | None = None, seed: int | None = None) -> dict:
        """After ``accelerator.prepare`` (and ``register_for_checkpointing``): load the state when
        resuming, then (rank 0) create the folder, save ``config.yaml`` and open tensorboard.
        Returns the resumed ``trainer.json`` (``{}`` for a new run).

        ``seed`` (the run's seed, with which every rank built the same networks): ranks > 0 go on
        from (seed, rank), so that each draws its own noise and timesteps (all ranks would draw the
        same for their different batches); rank 0 keeps its stream. A resumed state then restores
        every rank's own."""
        from torch.utils.tensorboard import SummaryWriter

        self.accelerator, self.bad_items = accelerator, bad_items
        if seed is not None and accelerator.process_index > 0:
            seed_everything(derived_seed(int(seed), accelerator.process_index))
        if self.state_dir is not None:  # a damaged state: state.old, or one UserError line
            self.state_dir, info = load_state(accelerator, self.out_dir, self.state_dir)
            self.resumed_rng = rng_state()  # what load_state restored: the RNG states at the save
            self.continue_at(info["step"], info)
            if bad_items is not None:  # the unreadable items met before the save count on
                bad_items.indices.update(int(i) for i in info.get("bad_items", ()))
        if accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
            self.writer = SummaryWriter(str(self.out_dir / "tb"))
        return self.info

    def continue_at(self, step: int, info: dict, rng: dict | None = None, source: Path | None = None) -> None:
        """Continue at ``step`` (``info``: the saved extras); ``rng``/``source`` for a trainer that
        read its own checkpoint file."""
        self.step, self.info = step, info
        if rng is not None:
            self.resumed_rng = rng
        self.print(f"resuming from {source or self.state_dir} at step {step}")

    def print(self, text: str) -> None:
        if self.accelerator is not None:
            self.accelerator.print(text)
        else:
            from moditalker.device import is_main_rank

            if is_main_rank():
                print(text, flush=True)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def skipped_items(self) -> int:
        return len(self.bad_items) if self.bad_items is not None else 0

    def counted(self, batches: Iterable[dict]) -> Iterator[dict]:
        """``batches`` with every batch's unreadable-item stand-ins counted (:class:`BadItems`)."""
        for batch in batches:
            if self.bad_items is not None:
                self.bad_items.note_batch(batch)
            yield batch

    def write_record(self, record: dict) -> None:
        """One line of ``metrics.jsonl`` (rank 0)."""
        if self.main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def validate(self, step: int, validate: ValidateFn) -> dict | None:
        """Run ``validate(step)`` (every rank); rank 0 records what it returns: ``metrics.jsonl``
        (with the step and ``skipped_items``), tensorboard ``val/<name>`` for each ``val_<name>``."""
        values = validate(step)
        if values is None or not self.main:
            return values
        record = {"step": step, **values, "skipped_items": self.skipped_items}
        self.history.append(record)
        self.write_record(record)
        for key, value in values.items():
            if key.startswith("val_"):
                self.scalar(f"val/{key[4:]}", value, step)
        return record

    def save(self, step: int, extra: dict | None = None) -> None:
        """Save the accelerate state with ``{"step": step, **extra}`` and the unreadable items met so far
        (``bad_items``) as ``trainer.json`` (every rank)."""
        bad = sorted(self.bad_items.indices) if self.bad_items is not None else []
        save_state(self.accelerator, self.out_dir, {"step": step, **(extra or {}), "bad_items": bad})

    def loop(
        self,
        step_fn: StepFn,
        validate: ValidateFn,
        *,
        max_steps: int,
        log_every: int,
        val_every: int,
        save_every: int,
        desc: str,
        progress: bool = True,
        baseline: bool = True,
        postfix: tuple[str, ...] = ("loss",),
        train_records: bool = False,
        after_validation: Callable[[int, dict | None], None] | None = None,
        on_save: Callable[[int], dict] | None = None,
    ) -> int:
        """Train from :attr:`step` to ``max_steps``; returns the step reached.

        Per step, in this order: ``step_fn``; the logged averages (every ``log_every`` steps and at
        the last; ``train_records``: also a ``{"step", "train_loss", "skipped_items"}`` line in
        ``metrics.jsonl``); :meth:`validate` and ``after_validation(step, record)`` (every
        ``val_every``; e.g. writing the model files); ``on_save(step)`` (its dict joins
        ``trainer.json``) and the state (every ``save_every``). ``baseline``: a new run validates
        its initial weights first (step 0; ``after_validation`` is not called for it).
        """
        from tqdm.auto import tqdm

        if baseline and not self.resuming:
            self.validate(0, validate)
        bar = tqdm(total=max_steps, initial=self.step, disable=not (progress and self.main), desc=desc)
        running: dict[str, float] = {}
        n_running = 0
        while self.step < max_steps:
            logs = step_fn(self.step)
            self.step += 1
            step, last = self.step, self.step == max_steps
            bar.update(1)
            for key, value in logs.items():
                running[key] = running.get(key, 0.0) + float(value)
            n_running += 1
            if step % log_every == 0 or last:
                mean = {key: value / n_running for key, value in running.items()}
                for key, value in mean.items():
                    self.scalar(f"train/{key}", value, step)
                self.scalar("train/skipped_items", self.skipped_items, step)
                if train_records and "loss" in mean:
                    self.write_record(
                        {"step": step, "train_loss": mean["loss"], "skipped_items": self.skipped_items}
                    )
                bar.set_postfix({key: f"{mean[key]:.4f}" for key in postfix if key in mean})
                running, n_running = {}, 0
            if step % val_every == 0 or last:
                record = self.validate(step, validate)
                if after_validation is not None:
                    after_validation(step, record)
            if step % save_every == 0 or last:
                self.save(step, on_save(step) if on_save is not None else None)
        bar.close()
        return self.step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def seed_shared_shuffle(loader: Iterable[dict], seed: int, index: int) -> None:
    """Seed the shuffle generator that accelerate keeps across passes when several processes share a
    loader (``synchronized_generator``; one process shuffles from the global generators) from (seed,
    pass ``index``): a resumed run meets the order of the run it continues."""
    shuffle = getattr(loader, "synchronized_generator", None)
    if shuffle is not None:
        shuffle.manual_seed(derived_seed(seed, index))


class EpochBatches:
    """The batches of ``loader``, epoch after epoch, for an exact resume.

    Each epoch starts by seeding Python, NumPy and torch from (``seed``, epoch) and calling
    ``set_epoch(epoch)``, so an epoch's shuffle and random windows are functions of the seed and the
    epoch only (a dataset's own draws must be functions of its epoch and the index, as AToM's windows
    are: the batches passed over on resume are read again). :meth:`position` after a batch is (epoch,
    batches done in it); a run started with that ``position`` and the ``rng`` states of that moment
    passes over the batches already done and then restores ``rng``: it continues as the
    uninterrupted run would (noise, timesteps, dropout).

    Several processes (``rank`` > 0 on all but the first): accelerate shuffles every rank's share of
    an epoch with one generator that it keeps across epochs (``synchronized_generator``), which is
    seeded here from (seed, epoch) too, so a resumed run meets the same order. Every rank starts the
    epoch from the same seed (the shared shuffle); once its first batch is drawn, a rank > 0 goes on
    with its own seed, (seed, epoch, batch, rank), or else all ranks would draw the same noise and
    timesteps for their different batches. Rank 0 (and one process) keeps the epoch's seed. A rank > 0
    resumed without its own saved ``rng`` (one file holds rank 0's) takes that seed at the batch it
    resumes at: a stream of its own, not the one the uninterrupted run would have drawn.
    """

    def __init__(
        self,
        loader: Iterable[dict],
        seed: int,
        set_epoch: Callable[[int], None] | None = None,
        position: dict | None = None,
        rng: dict | None = None,
        rank: int = 0,
    ) -> None:
        self.loader, self.seed, self.set_epoch, self.rank = loader, int(seed), set_epoch, int(rank)
        position = position or {}
        self.epoch, self.batch = int(position.get("epoch", 0)), int(position.get("batch", 0))
        self._rng = rng

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> Iterator[dict]:
        skip = self.batch
        while True:
            seed_everything(derived_seed(self.seed, self.epoch))
            seed_shared_shuffle(self.loader, self.seed, self.epoch)
            if self.set_epoch is not None:
                self.set_epoch(self.epoch)
            for index, batch in enumerate(self.loader):
                if index < skip:
                    continue
                if self._rng is not None:
                    set_rng_state(self._rng)
                    self._rng = None
                elif index == skip and self.rank:  # the shuffle is drawn: this rank's own noise from here on
                    seed_everything(derived_seed(self.seed, self.epoch, index, self.rank))
                self.batch = index + 1
                yield batch
            self.epoch, self.batch, skip, self._rng = self.epoch + 1, 0, 0, None


class PassBatches:
    """``loader``'s batches pass after pass, without end, for an exact resume in the middle of a pass.

    The MToV datasets draw their random windows from the global generators when a batch is read (in
    the main process, or in the loader's workers, seeded from them when a pass begins), and
    accelerate's loader reads one batch ahead. So :meth:`record` keeps the random states at the
    beginning of the pass and before the loader was last asked for a batch, with the count of passes
    begun before and of the batches done in this one (the trainers save it in ``trainer.json`` as
    ``data_pass``). A run resumed from such a record begins the pass again from those states, asks
    the loader for the batches already trained on (the same draws in the same order; not trained on
    again), the last time from the second states, and then takes ``rng``, the states at the save: it
    goes on as the uninterrupted run would (noise, timesteps, windows). Keeping the states draws
    nothing: the run's random streams are those of iterating ``loader`` plainly. With several
    processes accelerate's shuffle generator (kept across passes) is seeded from (seed, pass) at each
    pass, so a resumed run meets the same order; the record is rank 0's, so other ranks draw their
    windows anew. A record that is missing (a state saved by an older version) or damaged begins a
    new pass from ``rng``. A pass without any batch is an error, not an endless loop.
    """

    def __init__(self, loader: Iterable[dict], seed: int, record: object = None, rng: dict | None = None):
        self.loader, self.seed = loader, int(seed)
        self.passes, self.batch = 0, 0
        self.pass_rng: dict | None = None  # the random states when this pass began
        self.read_rng: dict | None = None  # ... and before the loader was last asked for a batch
        self._rng = rng
        if isinstance(record, dict) and is_count(record.get("passes")) and is_count(record.get("batch")):
            pass_rng, read_rng = rng_from_json(record.get("rng")), rng_from_json(record.get("read_rng"))
            if pass_rng is not None and read_rng is not None:
                self.passes, self.batch = int(record["passes"]), int(record["batch"])
                self.pass_rng, self.read_rng = pass_rng, read_rng
        if rng is not None and self.pass_rng is None:  # resumed from a state without a usable record
            from moditalker.device import is_main_rank

            if is_main_rank():
                note = "the saved state has no usable data_pass record (an older version's, or damaged)"
                print(
                    f"note: {note}: the run goes on with a new pass over the data",
                    file=sys.stderr,
                    flush=True,
                )

    def record(self) -> dict:
        """Where the stream is (JSON): passes begun before this one, batches done in it, the random
        states at its beginning and before the last batch was asked for."""
        states = [None if s is None else rng_to_json(s) for s in (self.pass_rng, self.read_rng)]
        return {"passes": self.passes, "batch": self.batch, "rng": states[0], "read_rng": states[1]}

    def __iter__(self) -> Iterator[dict]:
        skip, restore, replay_last = self.batch, self._rng, self.read_rng
        self._rng = None
        while True:
            if skip:  # the pass as it began
                set_rng_state(self.pass_rng)
            else:
                if restore is not None:
                    set_rng_state(restore)
                    restore = None
                self.pass_rng = rng_state()
            seed_shared_shuffle(self.loader, self.seed, self.passes)
            batches = iter(self.loader)
            self.batch = 0
            while True:
                if self.batch == skip - 1:  # asked for as the run asked for it before the save
                    set_rng_state(replay_last)
                self.read_rng = rng_state()
                batch = next(batches, None)
                if batch is None:
                    break
                self.batch += 1
                if self.batch < skip:
                    continue  # trained on before the save: read again, not trained on
                if self.batch == skip:  # the last one trained on: the states at the save from here on
                    if restore is not None:
                        set_rng_state(restore)
                        restore = None
                    continue
                yield batch
            skip = 0  # a shorter pass than the record's (other data): the next pass begins from ``rng``
            if self.batch == 0:
                raise UserError(
                    "the training loader gave no batch; lower train.batch_size or add training data"
                )
            self.passes += 1
