"""MToV diffusion training: the loss falls on synthetic clips, resume works, EMA follows LitEma."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mtov_synth import write_synthetic_hdtf
from torch import nn

from moditalker.errors import UserError
from moditalker.training.ema import LitEMA
from MToV.generate import generate_video
from MToV.loading import load_mtov
from MToV.train_diffusion import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "mtov_tiny.yaml")


def test_ema_decay_schedule():
    net = nn.Linear(2, 1)
    ema = LitEMA(net, decay=0.9999)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # n = 1: decay = 2 / 11
    expected = start + (1 - 2 / 11) * 1.0
    torch.testing.assert_close(ema.averaged_state_dict(net)["weight"], expected)
    ema.num_updates.fill_(10**6)
    ema.update(net)  # decay capped at 0.9999
    torch.testing.assert_close(
        ema.averaged_state_dict(net)["weight"], expected + 1e-4 * (start + 1 - expected)
    )
    other = nn.Linear(2, 1)
    ema.copy_to(other)
    torch.testing.assert_close(other.weight, ema.averaged_state_dict(net)["weight"])


def test_training_learns_and_resumes(tmp_path):
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to a shared CPU
    info = write_synthetic_hdtf(
        tmp_path / "hdtf", ids=("WDA_A_000", "WDA_B_000", "RD_C_000"), heldout=("RD_C_000",), n_frames=16
    )
    out = tmp_path / "run"
    common = [
        "--config",
        TINY,
        "--out_dir",
        str(out),
        "--device",
        "cpu",
        "--no_progress",
        f"data.root={info.root}",
        f"data.split_file={info.split_file}",
        "random_autoencoders=true",
        "train.batch_size=4",
        "train.save_every=20",
        "train.ema_every=5",
        "data.max_val_clips=4",
    ]
    first = main([*common, "train.max_steps=20"])
    assert first["step"] == 20 and len(first["train_losses"]) == 20
    second = main([*common, "train.max_steps=60"])  # resumes from {out}/state at step 20
    assert second["step"] == 60 and len(second["train_losses"]) == 40
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 20, 40, 60]
    val = [r["val_loss"] for r in records]
    assert val[-1] < 0.6 * val[0], val  # the eps loss falls clearly (starts near E[eps^2] = 1)
    losses = first["train_losses"] + second["train_losses"]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    # the EMA state was restored on resume: 60 steps / ema_every 5 = 12 updates, not 40 / 5 = 8
    (ema_file,) = (out / "state").glob("custom_checkpoint_*.pkl")
    assert int(torch.load(ema_file, weights_only=True)["num_updates"]) == 12

    # the EMA checkpoint is what MToV.sample loads (strict), with any AE of the configured size
    rnd = load_mtov(None, None, None, config=TINY, random_weights=True)
    torch.save(rnd.ae_rgb.state_dict(), tmp_path / "ae.pth")
    models = load_mtov(
        str(tmp_path / "ae.pth"), str(tmp_path / "ae.pth"), str(out / "diffusion_model.pth"), config=TINY
    )
    s = models.resolution
    video = generate_video(
        models,
        np.zeros((3, 3, s, s), np.uint8),
        np.full((3, 3, s, s), 128, np.uint8),
        np.full((3, s, s), 128, np.uint8),
        sampling_timesteps=8,
        progress=False,
    )
    assert video.shape == (3, 3, s, s)

    with pytest.raises(UserError, match="no resumable state|--overwrite"):
        main([*common[:4], "--out_dir", str(tmp_path / "hdtf"), f"data.root={info.root}"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_the_middle_of_a_pass_is_exact(tmp_path, workers):
    """8 training videos, 4 batches a pass, saved after 3 and after 5 (the second pass): the resumed run
    read the windows anew in a new pass (another order, other random windows); now it ends at the
    uninterrupted run's weights, with the windows drawn in the main process or in loader workers."""
    torch.set_num_threads(1)
    ids = tuple(f"WDA_{c}_000" for c in "ABDEFGHI") + ("RD_C_000",)
    info = write_synthetic_hdtf(tmp_path / "hdtf", ids=ids, heldout=("RD_C_000",), n_frames=16)

    def train(out: str, steps: int, every: int) -> None:
        main(["--config", TINY, "--out_dir", str(tmp_path / out), "--device", "cpu", "--no_progress",
              f"data.root={info.root}", f"data.split_file={info.split_file}", "random_autoencoders=true",
              "train.batch_size=2", f"train.save_every={every}", "train.ema_every=1", "data.max_val_clips=1",
              f"data.num_workers={workers}", f"train.max_steps={steps}"])  # fmt: skip

    train("straight", 7, 1)
    for stop in (3, 5):
        train(f"resumed{stop}", stop, 1)
        saved = json.loads((tmp_path / f"resumed{stop}" / "state" / "trainer.json").read_text())["data_pass"]
        assert (saved["passes"], saved["batch"]) == divmod(stop, 4)
        train(f"resumed{stop}", 7, 1)
        a = torch.load(tmp_path / "straight" / "model_last.pth", weights_only=True)
        b = torch.load(tmp_path / f"resumed{stop}" / "model_last.pth", weights_only=True)
        assert all(torch.equal(v, b[k]) for k, v in a.items()), stop


def test_a_non_finite_training_loss_stops_the_run(tmp_path):
    """A diverging run (here: a learning rate of 1e30) stops at the first NaN loss with one line, as
    AToM's trainer does, instead of training on to NaN weights and a NaN val_loss with exit 0."""
    torch.set_num_threads(1)
    info = write_synthetic_hdtf(
        tmp_path / "hdtf", ids=("WDA_A_000", "RD_C_000"), heldout=("RD_C_000",), n_frames=16
    )
    out = tmp_path / "run"
    with pytest.raises(UserError) as raised:
        main(["--config", TINY, "--out_dir", str(out), "--device", "cpu", "--no_progress",
              f"data.root={info.root}", f"data.split_file={info.split_file}", "random_autoencoders=true",
              "train.batch_size=2", "train.max_steps=6", "train.save_every=3", "data.max_val_clips=2",
              "train.lr=1e30"])  # fmt: skip
    assert str(raised.value).startswith("training loss became nan at step 2; lower train.lr, or check the")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0] and np.isfinite(records[0]["val_loss"])  # the baseline only
    assert not (out / "state").exists() and not (out / "diffusion_model.pth").exists()
