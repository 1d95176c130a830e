"""AToM training: both dataset formats, checkpoints/resume, and a tiny model that learns (CPU).

The synthetic data: HuBERT-like features carry a slowly varying loudness envelope; the mouth/jaw
landmarks open with it. A window's landmark motion is therefore fully determined by its audio, and a
model that uses the audio can predict it; one that does not cannot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from atom_synth import DIM, HORIZON, LIP, make_clip, write_npz_clips

from AToM.dataset import GeneFaceSource, NpzFolderSource, WindowDataset, open_sources, write_indexed_dataset
from AToM.inference import generate_landmarks, load_atom, window_starts
from AToM.train import main as train_main
from moditalker.errors import UserError, cli_main

REPO = Path(__file__).resolve().parents[2]


# tiny models: one thread is fastest and does not fight other test processes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = str(REPO / "configs" / "atom_tiny.yaml")
TRAIN_STEPS = 1000
STEPS_SEAM = 50


# ---------------------------------------------------------------------------- datasets
def test_npz_and_geneface_formats_agree(tmp_path):
    clips = write_npz_clips(tmp_path / "npz" / "train", 5, seed=3, frames=(10, 40))
    write_npz_clips(tmp_path / "npz" / "val", 2, seed=4)
    gf = tmp_path / "lrs3"
    items = [{"item_id": f"c{i}", "mel": np.zeros((3, 80)), **c} for i, c in enumerate(clips)]
    write_indexed_dataset(gf / "train", items)
    np.save(gf / "sizes_train.npy", np.array([len(c["hubert"]) for c in clips]))
    tr_npz, va_npz = open_sources(tmp_path / "npz")
    tr_gf, va_gf = open_sources(gf)
    assert isinstance(tr_npz, NpzFolderSource) and isinstance(tr_gf, GeneFaceSource)
    assert len(va_npz) == 2 and va_gf is tr_gf  # no val.data: the train split doubles as val
    np.testing.assert_array_equal(tr_npz.lengths, tr_gf.lengths)
    a = WindowDataset(tr_npz, 24, min_frames=4, deterministic=True)
    b = WindowDataset(tr_gf, 24, min_frames=4, deterministic=True)
    assert len(a) == len(b) == 5
    for i in range(5):
        ia, ib = a[i], b[i]
        for k in ("x", "hubert", "mask"):
            assert torch.equal(ia[k], ib[k])
        assert ia["x"].shape == (24, 204) and ia["hubert"].shape == (48, DIM) and ia["mask"].shape == (24,)


def test_window_dataset_crops_and_pads(tmp_path):
    rng = np.random.default_rng(0)
    long_clip, short_clip = make_clip(rng, 50), make_clip(rng, 10)
    np.savez(tmp_path / "a.npz", **long_clip)
    np.savez(tmp_path / "b.npz", **short_clip)
    src = NpzFolderSource([tmp_path / "a.npz", tmp_path / "b.npz"])
    ds = WindowDataset(src, 24, min_frames=4)
    assert len(ds) == 3 + 1  # ceil(50/24) windows of the long clip per epoch, 1 of the short one
    torch.manual_seed(0)
    item = ds[0]
    x = item["x"].numpy().reshape(24, 68, 3)
    start = int(np.argmin(np.abs(long_clip["idexp_lm3d"] - x[0]).sum((1, 2))))
    np.testing.assert_array_equal(x, long_clip["idexp_lm3d"][start : start + 24])
    np.testing.assert_array_equal(item["hubert"].numpy(), long_clip["hubert"][2 * start : 2 * start + 48])
    short = ds[3]
    assert short["mask"].sum() == 10 and not short["mask"][10:].any()
    np.testing.assert_array_equal(short["x"].numpy()[10:], np.repeat(short["x"].numpy()[9:10], 14, 0))
    assert len(WindowDataset(src, 24, min_frames=20)) == 3  # clips below min_frames are skipped


def test_bad_data_folder_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_sources(tmp_path / "missing")
    with pytest.raises(UserError, match="no AToM training data"):
        open_sources(tmp_path)
    np.savez(tmp_path / "x.npz", hubert=np.zeros((10, 4), np.float32))
    with pytest.raises(UserError, match="idexp_lm3d"):
        open_sources(tmp_path)


# ---------------------------------------------------------------------------- training
def _train(root: Path, out: Path, steps: int, *extra: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and does not fight other processes
    try:
        _train_cli(root, out, steps, *extra)
    finally:
        torch.set_num_threads(threads)


def _train_cli(root: Path, out: Path, steps: int, *extra: str) -> None:
    train_main(
        [
            "--config",
            TINY,
            "--cpu",
            f"data.root={root}",
            f"train.out_dir={out}",
            f"train.max_steps={steps}",
            "train.log_every=25",
            f"train.val_every={max(steps // 2, 1)}",
            f"train.save_every={max(steps // 2, 1)}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("atom_data")
    write_npz_clips(root, 128, seed=0)
    held_out = write_npz_clips(root.parent / (root.name + "_heldout"), 6, seed=1, frames=(90, 120))
    out = tmp_path_factory.mktemp("atom_run")
    torch.manual_seed(0)
    _train(root, out, TRAIN_STEPS)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "log": log, "held_out": held_out, "root": root}


def test_checkpoint_layout_and_loading(trained):
    ckpts = sorted((trained["out"] / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts] == [f"step_{TRAIN_STEPS // 2:08d}.pt", f"step_{TRAIN_STEPS:08d}.pt"]
    ck = torch.load(ckpts[-1], weights_only=True)
    assert {"model_state_dict", "ema_state_dict", "optimizer_state_dict"} <= set(ck)
    assert ck["step"] == TRAIN_STEPS and ck["config"]["model"]["seq_len"] == HORIZON
    d, e = load_atom(ckpts[-1]), load_atom(ckpts[-1], ema=True)
    assert not torch.equal(d.model.final_layer.weight, e.model.final_layer.weight)
    assert (trained["out"] / "config.yaml").is_file()
    assert any((trained["out"] / "tb").iterdir())


def test_training_loss_falls(trained):
    train_losses = [r["train_loss"] for r in trained["log"] if "train_loss" in r]
    val = [r["val_loss"] for r in trained["log"] if "val_loss" in r]
    assert train_losses[-1] < 0.4 * train_losses[0], train_losses
    assert val[-1] < val[0], val


def _mouth_error(d, clips, guidance: float, seed: int = 0, swap: bool = False) -> float:
    """Mean squared error of the generated mouth/jaw landmarks over one window per clip."""
    errs = []
    for i, c in enumerate(clips):
        lm = c["idexp_lm3d"][:HORIZON]
        hub = clips[(i + 1) % len(clips)]["hubert"] if swap else c["hubert"]
        out = generate_landmarks(
            d,
            hub[: 2 * HORIZON],
            lm[0] / 10,
            np.zeros((68, 3), np.float32),
            steps=10,
            seed=seed,
            guidance_weight=guidance,
            progress=False,
        )
        errs.append(((out * 10 - lm)[:, LIP] ** 2).mean())
    return float(np.mean(errs))


def test_trained_model_tracks_audio(trained):
    ckpt = sorted((trained["out"] / "checkpoints").glob("step_*.pt"))[-1]
    clips = trained["held_out"]
    static = float(
        np.mean([((c["idexp_lm3d"][:HORIZON] - c["idexp_lm3d"][:1])[:, LIP] ** 2).mean() for c in clips])
    )
    d = load_atom(ckpt)
    cfg = torch.load(ckpt, weights_only=True)["config"]
    untrained = load_atom(None, config=cfg, random_weights=True)
    err = _mouth_error(d, clips, guidance=2.0)
    err_untrained = _mouth_error(untrained, clips, guidance=2.0)
    err_swapped = _mouth_error(d, clips, guidance=2.0, swap=True)  # someone else's audio
    print(
        f"mouth MSE: trained {err:.5f}, untrained {err_untrained:.5f}, wrong audio {err_swapped:.5f}, "
        f"static {static:.5f}"
    )
    assert err < 0.1 * err_untrained
    assert err < 0.3 * err_swapped
    assert err < 0.3 * static


def test_long_audio_has_no_jump_at_seams(trained):
    """Where windows meet there is no jump: the frame-to-frame step at a seam is no larger than the
    steps inside windows (up to 25 %, since the true motion's speed varies), and the second difference
    at a seam stays within twice its largest value inside windows (sampling with eta 1 jitters)."""
    ckpt = sorted((trained["out"] / "checkpoints").glob("step_*.pt"))[-1]
    d = load_atom(ckpt)
    overlap = 8
    for c in trained["held_out"][:3]:
        n = len(c["idexp_lm3d"])
        out = generate_landmarks(
            d,
            c["hubert"],
            c["idexp_lm3d"][0] / 10,
            np.zeros((68, 3), np.float32),
            steps=STEPS_SEAM,
            seed=0,
            overlap=overlap,
            progress=False,
        ).reshape(n, -1)
        starts = window_starts(n, HORIZON, overlap)
        assert len(starts) >= 4
        step = np.linalg.norm(np.diff(out, axis=0), axis=1)  # step[i]: frame i -> i + 1
        accel = np.linalg.norm(np.diff(out, 2, axis=0), axis=1)  # accel[i]: around frame i + 1
        at_seam = np.zeros(n - 1, bool)  # steps into the overlap, into the cross-fade, into new frames
        filled = HORIZON
        for s in starts[1:]:
            at_seam[[s - 1, s + (filled - s + 1) // 2 - 1, filled - 1]] = True
            filled = s + HORIZON
        acc_seam = np.zeros(n - 2, bool)
        around = (np.nonzero(at_seam)[0][:, None] + np.array([-1, 0])).ravel()
        acc_seam[np.clip(around, 0, n - 3)] = True
        print(
            f"T={n}: step at seams {step[at_seam].max():.4f} (inside {step[~at_seam].max():.4f}), "
            f"2nd diff at seams {accel[acc_seam].max():.4f} (inside {accel[~acc_seam].max():.4f})"
        )
        assert step[at_seam].max() <= 1.25 * step[~at_seam].max()
        assert accel[acc_seam].max() <= 2.0 * accel[~acc_seam].max()


def test_resume_after_crash(tmp_path, capsys):
    """A second run with more steps continues from the last checkpoint (weights, EMA, Adan state)."""
    root = tmp_path / "data"
    write_npz_clips(root, 6, seed=5)
    out = tmp_path / "run"
    _train(root, out, 4, "train.batch_size=4")
    first = torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert first["optimizer_state_dict"]["state"], "Adan state saved"
    _train(root, out, 6, "train.batch_size=4", "train.save_every=100")
    assert f"resuming from {out / 'state'} at step 4" in capsys.readouterr().out
    second = torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert second["step"] == 6
    steps = [s["step"] for s in second["optimizer_state_dict"]["state"].values()]
    assert max(steps) == 6  # Adan's own step counter continued from 4
    key = "final_layer.weight"
    assert not torch.equal(first["model_state_dict"][key], second["model_state_dict"][key])


def test_train_cli_bad_data_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(train_main, ["--config", TINY, "--cpu", f"data.root={tmp_path / 'nope'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training data folder not found" in err[0]
    with pytest.raises(SystemExit):
        cli_main(train_main, ["--config", TINY, "model.seq_len=12", f"data.root={tmp_path}"])
    assert "must equal model.seq_len" in capsys.readouterr().err


def test_resume_from_another_runs_checkpoint_needs_a_new_folder(tmp_path):
    """train.resume=PATH of another run into a folder with files would prune that folder's step
    checkpoints: refused before any work, the folder left as it was."""
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000001.pt").write_bytes(b"mine")
    other = tmp_path / "other" / "checkpoints" / "step_00000004.pt"
    args = [
        "--config",
        TINY,
        "--cpu",
        "--out_dir",
        str(out),
        f"data.root={tmp_path}",
        f"train.resume={other}",
    ]
    with pytest.raises(UserError, match="already holds files.*--overwrite"):
        train_main(args)
    assert (out / "checkpoints" / "step_00000001.pt").read_bytes() == b"mine"


def test_resume_is_exact(tmp_path):
    """Kill + re-run gives the weights of an uninterrupted run: the RNG states and the position in the
    epoch are in the checkpoint (a resumed run re-seeded from train.seed and restarted the data order)."""
    root = tmp_path / "data"
    write_npz_clips(root, 6, seed=5)
    common = ("train.batch_size=4", "train.save_every=3", "train.val_every=3", "train.keep_checkpoints=10")
    _train(root, tmp_path / "straight", 9, *common)
    _train(root, tmp_path / "resumed", 3, *common)  # stops at step 3 (a crash after the save)
    _train(root, tmp_path / "resumed", 9, *common)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step_00000009.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "step_00000009.pt", weights_only=True)
    assert a["data_position"]["epoch"] >= 1  # the run crossed at least one epoch boundary
    assert (tmp_path / "resumed" / "state" / "trainer.json").is_file()  # resumed from state/
    # a run folder of the older layout (step checkpoints, no state/) resumes from its newest checkpoint
    _train(root, tmp_path / "old_layout", 3, *common)
    shutil.rmtree(tmp_path / "old_layout" / "state")
    _train(root, tmp_path / "old_layout", 9, *common)
    c = torch.load(tmp_path / "old_layout" / "checkpoints" / "step_00000009.pt", weights_only=True)
    for key in ("model_state_dict", "ema_state_dict"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
            assert torch.equal(value, c[key][name]), ("old layout", key, name)


def test_unreadable_clips_are_skipped_counted_and_limited(tmp_path, capsys):
    """One corrupt clip among good ones stopped the run with np.load's traceback."""
    root = tmp_path / "data"
    write_npz_clips(root, 8, seed=3)
    (root / "zz_truncated.npz").write_bytes(
        (root / sorted(p.name for p in root.iterdir())[0]).read_bytes()[:50]
    )
    (root / "zz_text.npz").write_text("not an archive")
    out = tmp_path / "run"
    _train(root, out, 2, "train.batch_size=2", "data.max_bad_items=2")
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped an unreadable")]
    assert len(warnings) == 2 and any("zz_truncated.npz" in w for w in warnings), err
    assert (out / "checkpoints" / "step_00000002.pt").is_file()
    # more unreadable clips than allowed: one line naming the first, before any training
    argv = ["--config", TINY, "--cpu", f"data.root={root}", f"train.out_dir={tmp_path / 'b'}"]
    with pytest.raises(SystemExit) as info:
        cli_main(train_main, [*argv, "data.max_bad_items=1"])
    code = info.value.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "2 of 9 clips cannot be read" in lines[0], lines
    assert "allow_pickle" not in lines[0]  # no advice to unpickle an untrusted file
    assert not (tmp_path / "b").exists()
    # --check lists them all and exits 2 without training
    with pytest.raises(SystemExit) as info:
        cli_main(train_main, ["--config", TINY, "--check", f"data.root={root}"])
    out_text = capsys.readouterr().out
    assert info.value.code == 2
    assert sum(line.startswith("unreadable: ") for line in out_text.splitlines()) == 2, out_text


def test_skip_unreadable_keeps_the_batch_size_and_counts(tmp_path):
    from moditalker.errors import UserError
    from moditalker.training.bad_items import BadItems, SkipUnreadable

    class Flaky(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i in (1, 2):
                raise OSError(f"truncated file {i}")
            return {"v": torch.tensor(i)}

    ds = SkipUnreadable(Flaky(), lambda i: f"item{i}")
    items = [ds[i] for i in range(5)]
    assert [int(it["v"]) for it in items] == [0, 3, 3, 3, 4]
    assert [it["skipped_item"] for it in items] == [-1, 1, 2, -1, -1]
    batch = torch.utils.data.default_collate(items)
    bad = BadItems(2, 5, lambda i: f"item{i}")
    bad.note_batch(batch)
    assert len(bad) == 2
    bad = BadItems(0.2, 5, lambda i: f"item{i}")  # 20 % of 5 = 1 allowed
    with pytest.raises(UserError, match="2 training items are unreadable.*first: item1, item2"):
        bad.note_batch(batch)


def test_trainer_shares_the_run_options_and_refuses_typos(tmp_path):
    """AToM took ``train.out_dir=`` and ``--cpu``; the MToV trainers ``--out_dir`` and ``--device``."""
    root = tmp_path / "data"
    write_npz_clips(root, 6, seed=5)
    out = tmp_path / "flags"
    argv = ["--config", TINY, "--device", "cpu", "--out_dir", str(out), f"data.root={root}"]
    with pytest.raises(UserError, match="unknown setting train.max_stpes; did you mean train.max_steps"):
        train_main([*argv, "train.max_stpes=2"])
    assert not out.exists()
    train_main([*argv, "train.max_steps=2", "train.batch_size=4", "--no_progress"])
    assert (out / "checkpoints" / "step_00000002.pt").is_file()
    with pytest.raises(UserError, match="add --overwrite"):
        train_main([*argv, "train.max_steps=2", "--no_resume"])


def test_feature_width_mismatch_is_one_line(tmp_path):
    """1024-wide features on the tiny config ended in "mat1 and mat2 shapes cannot be multiplied"."""
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        np.savez(root / f"c{i}.npz", hubert=np.zeros((60, 1024), np.float32),
                 idexp_lm3d=np.zeros((30, 68, 3), np.float32))  # fmt: skip
    with pytest.raises(
        UserError, match=r"1024-wide HuBERT features but model.cond_feature_dim is 16.*--hubert_dim 16"
    ):
        train_main(
            ["--config", TINY, "--device", "cpu", "--out_dir", str(tmp_path / "o"), f"data.root={root}"]
        )
