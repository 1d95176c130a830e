"""The trainers' skeleton (moditalker.training.loop) on a toy model: the run folder, the baseline, the
records, the state, and a resume that ends at the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from moditalker.errors import UserError
from moditalker.training.bad_items import BadItems
from moditalker.training.loop import EpochBatches, TrainingRun
from moditalker.training.rng import rng_state


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


def _stream_batches(position=None, rng=None, n=9) -> tuple[list, list]:
    data = Noisy()
    stream = EpochBatches(DataLoader(data, 2, shuffle=True), 3, _set_epoch(data), position, rng)
    batches, states = [], []
    for batch in stream:
        batches.append((batch["x"], torch.rand(1)))  # the step's own draw (noise, timesteps)
        states.append((stream.position(), rng_state()))
        if len(batches) == n:
            return batches, states
    raise AssertionError("unreachable")


def test_epoch_batches_resume_where_they_stopped():
    straight, states = _stream_batches()
    assert states[3][0] == {"epoch": 0, "batch": 4} and states[4][0] == {"epoch": 1, "batch": 1}
    for k in (2, 4, 5):  # mid-epoch, at the epoch's last batch, at the next epoch's first
        position, rng = states[k]
        resumed, _ = _stream_batches(position, rng, n=9 - k - 1)
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
