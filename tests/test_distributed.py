"""Several processes: every trainer through its script with NUM_PROCESSES=2 on this CPU.

``scripts/_train.sh`` starts the ranks with torchrun (``accelerate launch --multi_gpu``); without a GPU
the trainers join one gloo process group (MULTI_CPU). This runs the same code paths as a multi-GPU
or multi-node run: process-group set-up, DDP gradient sync, sharded loaders, ``no_sync`` under
gradient accumulation, main-process-only writes, ``wait_for_everyone`` around checkpoints, resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from atom_synth import write_npz_clips
from mtov_synth import write_synthetic_hdtf

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    script: str, *args: str, processes: int = 2, config: str | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": sys.executable,  # the test's interpreter; no venv set-up from inside the suite
        "NUM_PROCESSES": str(processes),
        "OMP_NUM_THREADS": "1",
        "MAIN_PROCESS_PORT": str(_free_port()),  # no clash with another job on this machine
    }
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    if config:
        env["CONFIG"] = str(REPO / "configs" / config)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def _summary(proc: subprocess.CompletedProcess) -> dict:
    """The JSON line the MToV trainers print on rank 0 only."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # printed once, not once per rank
    return json.loads(lines[0])


def test_atom_two_processes_train_and_resume(tmp_path):
    write_npz_clips(tmp_path / "data", 32, seed=0)
    out = tmp_path / "run"
    common = [
        f"data.root={tmp_path / 'data'}",
        f"train.out_dir={out}",
        "train.val_every=2",
        "train.save_every=2",
    ]
    first = _launch("train_atom.sh", *common, "train.max_steps=4", config="atom_tiny.yaml")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in first.stdout
    assert first.stdout.count("last checkpoint:") == 1  # rank 0 only
    second = _launch("train_atom.sh", *common, "train.max_steps=6", config="atom_tiny.yaml")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {out / 'state'} at step 4" in second.stdout
    ckpt = torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=False, map_location="cpu")
    assert ckpt["step"] == 6
    # the wrapped (DDP) model is saved unwrapped: official key names, no "module." prefix
    assert not any(k.startswith("module.") for k in ckpt["model_state_dict"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in records if "val_loss" in r]
    assert val_steps == [0, 2, 4, 6]  # one writer: no duplicated lines from the second rank


def test_mtov_diffusion_two_processes(tmp_path):
    info = write_synthetic_hdtf(
        tmp_path / "hdtf", ids=("WDA_A_000", "WDA_B_000", "RD_C_000"), heldout=("RD_C_000",), n_frames=16
    )
    out = tmp_path / "run"
    args = [
        "--out_dir",
        str(out),
        "--device",
        "cpu",
        "--no_progress",
        f"data.root={info.root}",
        f"data.split_file={info.split_file}",
        "random_autoencoders=true",
        "train.batch_size=2",
        "train.save_every=4",
        "train.max_steps=8",
        "data.max_val_clips=2",
    ]
    proc = _launch("train_mtov_diffusion.sh", *args, config="mtov_tiny.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc)
    assert summary["num_processes"] == 2 and summary["step"] == 8
    assert np.isfinite(summary["val_loss"])
    # every rank's RNG state is in the saved state (written before the folder was renamed)
    assert {p.name for p in (out / "state").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    resumed = _launch("train_mtov_diffusion.sh", *args[:-2], "train.max_steps=12", "data.max_val_clips=2",
                      config="mtov_tiny.yaml")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and _summary(resumed)["step"] == 12
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 4, 8, 12]
    sd = torch.load(out / "diffusion_model.pth", weights_only=True, map_location="cpu")
    assert not any(k.startswith("module.") for k in sd) and all(torch.isfinite(v).all() for v in sd.values())


def test_mtov_latent_cache_built_and_trained_by_two_processes(tmp_path):
    """Two processes build one latent cache (each its own videos) and train from it."""
    info = write_synthetic_hdtf(
        tmp_path / "hdtf", ids=("WDA_A_000", "WDA_B_000", "RD_C_000"), heldout=("RD_C_000",), n_frames=9
    )
    data = [
        f"data.split_file={info.split_file}",
        "random_autoencoders=true",
        "--device",
        "cpu",
        "--no_progress",
    ]
    cache = tmp_path / "cache"
    built = _launch("cache_mtov_latents.sh", f"data.root={info.root}", *data, "--out", str(cache),
                    config="mtov_tiny.yaml")  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in built.stdout
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["windows"] == 5 and sorted(manifest["videos"]) == sorted(info.ids)
    out = tmp_path / "run"
    args = ["--out_dir", str(out), f"data.latents={cache}", *data, "train.batch_size=2", "train.save_every=4"]
    proc = _launch("train_mtov_diffusion.sh", *args, "train.max_steps=4", config="mtov_tiny.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc)
    assert summary["num_processes"] == 2 and summary["step"] == 4 and np.isfinite(summary["val_loss"])


def test_mtov_autoencoder_gan_accumulation_two_processes(tmp_path):
    synth = write_synthetic_hdtf(tmp_path / "hdtf", n_frames=24)
    out = tmp_path / "gan"
    proc = _launch(
        "train_mtov_ae.sh",
        "--out_dir",
        str(out),
        "--device",
        "cpu",
        "--no_progress",
        f"data.root={synth.root}",
        "loss.disc_start=1",
        "train.max_steps=2",
        "train.grad_accum=2",
        "train.val_every=2",
        "loss.perceptual_weight=0",
        config="mtov_autoencoder_tiny.yaml",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc)
    assert summary["num_processes"] == 2 and summary["step"] == 2 and np.isfinite(summary["best_val_psnr"])
    assert len(list((out / "state").glob("model*.safetensors"))) == 3  # AE + both discriminators
    assert len(list((out / "state").glob("random_states_*.pkl"))) == 2
    sd = torch.load(out / "model_last.pth", weights_only=True, map_location="cpu")
    assert not any(k.startswith("module.") for k in sd)


@pytest.mark.parametrize(
    "script,out_args",
    [
        ("train_atom.sh", ["train.out_dir={out}"]),
        ("train_mtov_diffusion.sh", ["--out_dir", "{out}", "random_autoencoders=true"]),
    ],
)
def test_bad_input_under_launcher_is_one_line_per_rank(tmp_path, script, out_args):
    missing = tmp_path / "missing"
    args = [a.format(out=tmp_path / "out") for a in out_args]
    proc = _launch(script, f"data.root={missing}", *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: training stopped: " in proc.stderr
    assert any(line.startswith("error: ") and str(missing) in line for line in proc.stderr.splitlines())


def test_launcher_refuses_a_bad_process_count(tmp_path):
    proc = _launch("train_atom.sh", f"train.out_dir={tmp_path}", processes="two")
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: NUM_PROCESSES must be a positive integer, got 'two'"
    )
