"""The trainers' skeleton (moditalker.training.loop) on a toy model: the run folder, the baseline, the
records, the state, and a resume that ends at the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from moditalker.errors import UserError
from moditalker.training.bad_items import BadItems
from moditalker.training.loop import EpochBatches, PassBatches, TrainingRun
from moditalker.training.rng import rng_state, set_rng_state


class Noisy(Dataset):
    """Random items, a function of (epoch, index) as AToM's random windows are."""

    epoch = 0

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict:
        noise = torch.rand(3, generator=torch.Generator().manual_seed(self.epoch * 100 + i))
        return {"x": torch.full((3,), float(i)) + noise, "skipped_item": -1 if i != 5 else 4}


def _set_epoch(dataset: Noisy):
    return lambda epoch: setattr(dataset, "epoch", epoch)


def _collect(stream: EpochBatches, n: int) -> tuple[list, list]:
    """The first ``n`` batches of ``stream`` with the step's own draw after each, and (position, RNG
    states) after each."""
    batches, states = [], []
    for batch in stream:
        batches.append((batch["x"], torch.rand(1)))  # the step's own draw (noise, timesteps)
        states.append((stream.position(), rng_state()))
        if len(batches) == n:
            return batches, states
    raise AssertionError("unreachable")


def _stream_batches(position=None, rng=None, n=9) -> tuple[list, list]:
    data = Noisy()
    return _collect(EpochBatches(DataLoader(data, 2, shuffle=True), 3, _set_epoch(data), position, rng), n)


def test_epoch_batches_resume_where_they_stopped():
    straight, states = _stream_batches()
    assert states[3][0] == {"epoch": 0, "batch": 4} and states[4][0] == {"epoch": 1, "batch": 1}
    for k in (2, 4, 5):  # mid-epoch, at the epoch's last batch, at the next epoch's first
        position, rng = states[k]
        resumed, _ = _stream_batches(position, rng, n=9 - k - 1)
        for (xa, ra), (xb, rb) in zip(straight[k + 1 :], resumed):
            assert torch.equal(xa, xb) and torch.equal(ra, rb), k


def _rank_batches(rank: int, position=None, rng=None, n=9) -> tuple[list, list]:
    """As one rank of several processes meets its loader after ``accelerate.prepare``: the sampler
    shuffles with one generator kept across epochs (seeded once at prepare, from the global RNG, alike
    on every rank), exposed as ``synchronized_generator``."""
    from torch.utils.data import RandomSampler

    data = Noisy()
    shuffle = torch.Generator().manual_seed(1234)
    loader = DataLoader(data, 2, sampler=RandomSampler(data, generator=shuffle))
    loader.synchronized_generator = shuffle
    return _collect(EpochBatches(loader, 3, _set_epoch(data), position, rng, rank=rank), n)


def test_ranks_shuffle_alike_and_draw_their_own_noise():
    """Two ranks drew the same noise and timesteps for their different batches (one seed per epoch on
    every rank); the shared shuffle must stay shared."""
    rank0, _ = _rank_batches(0)
    rank1, _ = _rank_batches(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rank0, rank1))  # the same order of items
    assert not any(torch.equal(a[1], b[1]) for a, b in zip(rank0, rank1))  # noise of its own
    again, _ = _rank_batches(1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rank1, again))  # a function of the seed


@pytest.mark.parametrize("rank", [0, 1])
def test_several_processes_resume_in_the_same_order(rank):
    """accelerate's shuffle generator lives across epochs: a run resumed in a later epoch started it
    afresh and met another order than the uninterrupted run (one process shuffles from the global RNG,
    seeded per epoch). It is seeded from (seed, epoch) at each epoch."""
    straight, states = _rank_batches(rank)
    for k in (4, 6):  # the next epoch's first batch, mid-epoch
        position, rng = states[k]
        assert position["epoch"] == 1
        resumed, _ = _rank_batches(rank, position, rng, n=9 - k - 1)
        for (xa, ra), (xb, rb) in zip(straight[k + 1 :], resumed):
            assert torch.equal(xa, xb) and torch.equal(ra, rb), k


def _train(out: Path, max_steps: int, **kwargs) -> TrainingRun:
    from moditalker.training.accelerator import start_accelerator

    run = TrainingRun(out, **kwargs)
    acc = start_accelerator("toy train", cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = Noisy()
    loader = DataLoader(data, batch_size=2, shuffle=True)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(torch.nn.Linear(1, 1))  # a registered object: custom_checkpoint_0.pkl
    bad = BadItems(2, len(Noisy()), lambda i: f"item{i}")
    info = run.open(acc, {"toy": 1}, bad)
    stream = EpochBatches(loader, 0, _set_epoch(data), info.get("position"), run.resumed_rng)
    batches = run.counted(stream)

    def step_fn(step: int) -> dict:
        x = next(batches)["x"]
        loss = (model(x).squeeze(1) - x.sum(1) + torch.randn(len(x)) * 0.1).square().mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        return {"loss": float(loss.detach())}

    def validate(step: int) -> dict:
        with torch.no_grad():
            return {"val_mse": float((model(torch.ones(1, 3)) - 3).square())}

    run.loop(step_fn, validate, max_steps=max_steps, log_every=2, val_every=3, save_every=3, desc="toy",
             progress=False, on_save=lambda step: {"position": stream.position()})  # fmt: skip
    run.close()
    run.weights = {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    return run


def test_run_folder_records_state_and_exact_resume(tmp_path, capsys):
    torch.set_num_threads(1)
    straight = _train(tmp_path / "straight", 8)
    _train(tmp_path / "resumed", 3)
    resumed = _train(tmp_path / "resumed", 8)
    assert f"resuming from {tmp_path / 'resumed' / 'state'} at step 3" in capsys.readouterr().out
    assert straight.weights.keys() == resumed.weights.keys()
    assert all(torch.equal(straight.weights[k], resumed.weights[k]) for k in straight.weights)

    out = tmp_path / "resumed"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6, 8]  # the baseline once, not again on resume
    assert records[-1]["skipped_items"] == 1  # item 5 stood in for item 4 (counted on over the resume)
    assert records == [
        json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in resumed.history] == [6, 8]
    info = json.loads((out / "state" / "trainer.json").read_text())
    assert info["step"] == 8 and set(info["position"]) == {"epoch", "batch"} and info["bad_items"] == [4]
    assert (out / "config.yaml").read_text().strip() == "toy: 1"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert {"train/loss", "train/skipped_items", "val/mse"} <= set(events.Tags()["scalars"])

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no resumable state"):
        TrainingRun(tmp_path / "other")
    with pytest.raises(UserError, match="no resumable state"):  # no resume: a new run needs --overwrite
        TrainingRun(out, resume=False)
    TrainingRun(out, resume=False, overwrite=True)  # restart in place: the old state and records go
    assert not (out / "state").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "config.yaml").is_file()
    # --overwrite where there is nothing to resume starts anew too (it used to append to the old
    # records); of checkpoints/ only the step checkpoints go
    other = tmp_path / "other"
    (other / "tb").mkdir()
    (other / "metrics.jsonl").write_text('{"step": 0}\n')
    (other / "checkpoints").mkdir()
    (other / "checkpoints" / "step_00000100.pt").write_bytes(b"x")
    (other / "checkpoints" / "atom.pt").write_bytes(b"pretrained")
    TrainingRun(other, overwrite=True)
    assert not (other / "metrics.jsonl").exists() and not (other / "tb").exists()
    assert [p.name for p in (other / "checkpoints").iterdir()] == ["atom.pt"]
    assert (other / "notes.txt").read_text() == "x"


def test_a_checkpoint_to_start_from_is_never_a_file_the_run_writes(tmp_path):
    """Training the UNet into the autoencoder's folder would replace the autoencoder: refused before
    any work; checkpoints elsewhere (or none) pass."""
    from moditalker.training.run_state import check_inputs_are_not_outputs

    out = tmp_path / "ae_rgb"
    out.mkdir()
    (out / "model_last.pth").write_bytes(b"the autoencoder")
    with pytest.raises(UserError, match=r"checkpoints.ae_rgb=.*model_last.pth, which this run writes"):
        check_inputs_are_not_outputs(out, {"checkpoints.ae_rgb": out / "model_last.pth", "init_unet": None})
    relative = os.path.relpath(out / "model_last.pth")  # the same file named another way
    with pytest.raises(UserError, match="which this run writes"):
        check_inputs_are_not_outputs(out, {"init_from": relative})
    check_inputs_are_not_outputs(tmp_path / "unet", {"checkpoints.ae_rgb": out / "model_last.pth"})
    assert (out / "model_last.pth").read_bytes() == b"the autoencoder"


def _weights_equal(a: TrainingRun, b: TrainingRun) -> bool:
    return a.weights.keys() == b.weights.keys() and all(
        torch.equal(a.weights[k], b.weights[k]) for k in a.weights
    )


def _damage(path: Path, kind: str) -> None:
    """Damage a state file as a crash, a full disk or a stray edit leaves it."""
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 2)
    else:  # a trainer.json edit: "set:key=JSON" or "json:TEXT"
        if kind.startswith("json:"):
            path.write_text(kind[5:])
        else:
            key, value = kind[4:].split("=", 1)
            path.write_text(json.dumps({**json.loads(path.read_text()), key: json.loads(value)}))


DAMAGES = [
    ("trainer.json", "truncated"),
    ("trainer.json", "json:[1, 2]"),
    ("trainer.json", 'set:step="abc"'),
    ("trainer.json", "set:step=null"),
    ("trainer.json", "set:step=-5"),
    ("trainer.json", "set:step=true"),
    ("trainer.json", 'set:position="x"'),
    ("trainer.json", 'set:position={"epoch": -1, "batch": 0}'),
    ("trainer.json", 'set:bad_items=["a"]'),
    ("model.safetensors", "truncated"),
    ("model.safetensors", "empty"),
    ("optimizer.bin", "truncated"),
    ("optimizer.bin", "garbage"),
    ("custom_checkpoint_0.pkl", "empty"),
    ("custom_checkpoint_0.pkl", "garbage"),
]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A toy run stopped after its state at step 3."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("saved") / "run"
    _train(out, 3)
    return out


@pytest.mark.parametrize(("name", "kind"), DAMAGES)
def test_a_damaged_state_with_nothing_to_fall_back_on_is_one_line(saved_run, tmp_path, name, kind, capsys):
    """No traceback, no silent run from a nonsense step: one line naming the folder, what is wrong and
    the ways out; nothing of the run folder is changed."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    _damage(out / "state" / name, kind)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError) as info:
        _train(out, 8)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot resume from {out / 'state'} (")
    # no "move it away": a trainer without step checkpoints would then start again over the run's
    # metrics and weights (a run folder with only those counts as one stopped before its first state)
    assert msg.endswith("; rerun with --no_resume --overwrite to start the run again")
    if name == "trainer.json":
        assert "trainer.json" in msg
    elif kind in ("truncated", "empty", "garbage"):
        assert f"{name} is {'empty' if kind == 'empty' else 'damaged'}" in msg
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3  # no step trained
    # the way out it names starts the run again
    _train(out, 3, resume=False, overwrite=True)
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 3


@pytest.mark.parametrize("name", ["model.safetensors", "random_states_0.pkl"])
def test_a_damaged_state_falls_back_to_the_previous_one_exactly(tmp_path, name, capsys):
    """A save cut short can leave ``state.old`` beside ``state``: when ``state`` is damaged (its weights,
    or only its RNG states, which accelerate would skip with an info log) the run resumes from
    ``state.old`` with a warning, ends at the weights of an uninterrupted run, and saves on."""
    torch.set_num_threads(1)
    straight = _train(tmp_path / "straight", 8)
    out = tmp_path / "run"
    _train(out, 3)
    shutil.copytree(out / "state", tmp_path / "state_at_3")
    _train(out, 6)
    shutil.copytree(tmp_path / "state_at_3", out / "state.old")  # as a crash before its removal leaves it
    _damage(out / "state" / name, "truncated")
    capsys.readouterr()
    resumed = _train(out, 8)
    captured = capsys.readouterr()
    assert f"resuming from {out / 'state.old'} at step 3" in captured.out
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1, captured.err
    assert warning[0].startswith(f"warning: cannot resume from {out / 'state'}: {name} ")
    assert warning[0].endswith(
        f"resuming from {out / 'state.old'} (the previous save) instead; the damaged folder is kept as "
        f"{out / 'state.damaged'}"
    )
    assert _weights_equal(straight, resumed)
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 8
    assert not (out / "state.old").exists() and (out / "state.damaged" / name).is_file()


def test_lost_rng_states_resume_with_a_warning_when_nothing_better_is_there(saved_run, tmp_path, capsys):
    """Only the RNG states damaged and no ``state.old``: the weights, optimizer and step are intact, so
    the run resumes, with a warning that it will not repeat an uninterrupted run bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    _damage(out / "state" / "random_states_0.pkl", "garbage")
    capsys.readouterr()
    resumed = _train(out, 8)
    captured = capsys.readouterr()
    assert f"resuming from {out / 'state'} at step 3" in captured.out
    assert captured.err.count("warning: ") == 1
    assert (
        f"warning: the random-number states in {out / 'state'} did not load (random_states_0.pkl cannot "
        "be read (" in captured.err
    )
    assert "will not repeat an uninterrupted run bit for bit" in captured.err
    assert resumed.step == 8 and [r["step"] for r in resumed.history] == [6, 8]
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 8


def test_an_intact_state_with_a_leftover_state_old_resumes_and_saves(saved_run, tmp_path, capsys):
    """A crash while the previous state was being removed leaves part of ``state.old``: the run resumes
    from ``state`` without a warning and its next save replaces the leftover (it used to fail on the
    rename)."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    shutil.copytree(out / "state", out / "state.old")
    (out / "state.old" / "model.safetensors").unlink()
    capsys.readouterr()
    _train(out, 6)
    captured = capsys.readouterr()
    assert f"resuming from {out / 'state'} at step 3" in captured.out and "warning" not in captured.err
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == 6
    assert not (out / "state.old").exists()


def test_both_states_damaged_is_one_line_naming_both(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    shutil.copytree(out / "state", out / "state.old")
    _damage(out / "state" / "optimizer.bin", "empty")
    _damage(out / "state.old" / "trainer.json", "set:step=null")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step_00000002.pt").write_bytes(b"an AToM step checkpoint")
    with pytest.raises(UserError) as info:
        _train(out, 8)
    assert str(info.value) == (
        f"cannot resume from {out / 'state'} (optimizer.bin is empty) nor from {out / 'state.old'} "
        "(trainer.json's step is None, not an integer >= 0); rerun with --no_resume --overwrite to start "
        f"the run again, or move {out / 'state'} and {out / 'state.old'} away to resume from the newest "
        "checkpoints/step_*.pt"
    )
    assert (out / "state" / "trainer.json").is_file() and (out / "state.old" / "trainer.json").is_file()


def test_open_gives_every_rank_after_the_first_its_own_stream(tmp_path):
    """The MToV trainers seed every rank alike (the same networks) and then drew the same noise on every
    rank; ``open(seed=...)`` moves ranks > 0 to (seed, rank) before a resumed state is restored."""

    class Rank:
        is_main_process = False

        def __init__(self, index: int) -> None:
            self.process_index = index

        def print(self, *args) -> None:
            pass

    def draw(index: int, seed: int | None, before: int) -> torch.Tensor:
        torch.manual_seed(before)
        TrainingRun(tmp_path / "run").open(Rank(index), {}, seed=seed)
        return torch.rand(4)

    assert torch.equal(draw(1, 7, 0), draw(1, 7, 5))  # a function of (seed, rank)
    assert not torch.equal(draw(1, 7, 0), draw(2, 7, 0))
    assert not torch.equal(draw(1, 7, 0), draw(1, 8, 0))
    torch.manual_seed(0)
    untouched = torch.rand(4)
    assert torch.equal(draw(0, 7, 0), untouched)  # rank 0 (one process) keeps its stream
    assert torch.equal(draw(1, None, 0), untouched)  # no seed given: nothing changes
    assert not (tmp_path / "run").exists()  # only rank 0 writes the folder


class Drawn(Dataset):
    """Items drawn from the global generator when they are read, as the MToV datasets' random windows."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((3,), float(i)) + torch.rand(3)}


class ReadAhead:
    """A loader that reads one batch ahead, as accelerate's does (to know the last batch)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __iter__(self):
        batches = iter(self.loader)
        ahead = next(batches, None)
        while ahead is not None:
            batch, ahead = ahead, next(batches, None)
            yield batch


def _pass_batches(loader, record=None, rng=None, n=9) -> tuple[list, list]:
    stream = PassBatches(loader, 3, record, rng)
    batches, states = [], []
    for batch in stream:
        batches.append((batch["x"], torch.rand(1)))  # the step's own draw (noise, timesteps)
        states.append((json.loads(json.dumps(stream.record())), rng_state()))  # as trainer.json keeps it
        if len(batches) == n:
            return batches, states
    raise AssertionError("unreachable")


@pytest.mark.parametrize("read_ahead", [False, True])
def test_pass_batches_resume_in_the_middle_of_a_pass(read_ahead):
    """The MToV trainers began a new pass on resume: another shuffle, other random windows."""

    def loader():
        plain = DataLoader(Drawn(), 2, shuffle=True)
        return ReadAhead(plain) if read_ahead else plain

    torch.manual_seed(11)
    straight, states = _pass_batches(loader())
    assert [s[0]["passes"] for s in states] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    for k in (1, 3, 4):  # mid-pass, at the pass's last batch, at the next pass's first
        record, rng = states[k]
        resumed, _ = _pass_batches(loader(), record, rng, n=9 - k - 1)
        for (xa, ra), (xb, rb) in zip(straight[k + 1 :], resumed):
            assert torch.equal(xa, xb) and torch.equal(ra, rb), k
    torch.manual_seed(11)
    plain = [b["x"] for b, _ in zip((b for _ in range(3) for b in loader()), range(9))]
    assert not torch.equal(plain[2], straight[2][0])  # the steps' draws move the windows on


def test_pass_batches_without_a_usable_record_begin_a_new_pass(capsys):
    torch.manual_seed(5)
    _, states = _pass_batches(DataLoader(Drawn(), 2, shuffle=True), n=2)
    record, rng = states[1]
    for damaged in ({**record, "rng": "garbage"}, {**record, "read_rng": None}, {"passes": -1}, [], None):
        stream = PassBatches(DataLoader(Drawn(), 2, shuffle=True), 3, damaged, rng)
        assert (stream.passes, stream.batch, stream.pass_rng) == (0, 0, None)
        first = next(iter(stream))["x"]
        set_rng_state(rng)
        assert torch.equal(first, next(iter(DataLoader(Drawn(), 2, shuffle=True)))["x"])  # from ``rng``
        assert "no usable data_pass record" in capsys.readouterr().err
    PassBatches(DataLoader(Drawn(), 2), 3)  # a new run: nothing to say
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match="gave no batch"):
        next(iter(PassBatches(DataLoader(Drawn(), 8, drop_last=True), 3)))


def test_rng_states_survive_json():
    import random

    import numpy as np

    from moditalker.training.rng import rng_from_json, rng_to_json

    np.random.rand(3)  # a numpy state with a cached gaussian too
    np.random.standard_normal()
    saved = json.loads(json.dumps(rng_to_json(rng_state())))
    want = (random.random(), np.random.standard_normal(), torch.rand(2))
    set_rng_state(rng_from_json(saved))
    got = (random.random(), np.random.standard_normal(), torch.rand(2))
    assert want[:2] == got[:2] and torch.equal(want[2], got[2])
    assert rng_from_json({**saved, "torch": [1, 2, 3]}) is None  # not a generator state
    assert rng_from_json({"python": 1}) is None and rng_from_json("x") is None
