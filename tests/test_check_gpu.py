"""scripts/check_gpu.sh: what it refuses before it runs anything, and what a run leaves in its folder
(the full run on the tiny networks is the runnable block in docs/speed.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _check(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "check_gpu.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_no_cuda_is_one_line_and_creates_nothing(tmp_path):
    run = _check("--out", str(tmp_path / "check"))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == "error: --device cuda: PyTorch sees no CUDA device"
    assert "no CUDA device visible to PyTorch" in run.stderr  # what PyTorch is, said before the error
    assert not (tmp_path / "check").exists()


@pytest.mark.parametrize(
    "args,error",
    [
        (["--device", "cpu"], "error: --out OUT_DIR is required"),
        (["--out", "X", "--skip", "tests,bogus"], "error: --skip bogus: use tests, compile or training"),
        (["--out", "X", "--seconds", "four"], "error: --seconds four: give a number of seconds above 0"),
        (["--out", "X", "--seconds", "0"], "error: --seconds 0: give a number of seconds above 0"),
        (["--out", "X", "--seconds", "1.2."], "error: --seconds 1.2.: give a number of seconds above 0"),
        (["--out", "X", "--frames", "3"], "error: unrecognized argument: --frames"),
        (["--out"], "error: argument --out: expected one argument"),
    ],
)
def test_wrong_arguments_are_one_line(tmp_path, args, error):
    run = _check(*args, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().startswith(error), run.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_reports_are_kept_unless_overwrite(tmp_path):
    out = tmp_path / "check"
    out.mkdir()
    (out / "summary.txt").write_text("an earlier check\n")
    run = _check("--out", str(out), "--device", "cpu")
    assert run.returncode == 2
    assert "already holds files; pass --overwrite" in run.stderr
    assert (out / "summary.txt").read_text() == "an earlier check\n"
    (tmp_path / "file").write_text("x")
    run = _check("--out", str(tmp_path / "file"), "--device", "cpu")
    assert run.returncode == 2 and "is a file, not a folder" in run.stderr


def test_a_failing_step_is_reported_and_the_next_runs(tmp_path):
    """A relative --out is the caller's folder (the steps run in the repository root); a benchmark that
    fails (here: an unknown device) is one FAILED line in the summary, the later steps still run and
    the exit status is 1."""
    run = _check("--out", "rel", "--device", "nodevice", "--skip", "tests,compile", "--tiny", cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    summary = (tmp_path / "rel" / "summary.txt").read_text()
    lines = {line.split("  ")[0]: line for line in summary.splitlines()}
    assert "FAILED (exit 2)" in lines["inference benchmark"]
    assert "FAILED (exit 2)" in lines["training benchmark"]
    assert "CUDA tests" not in lines and "inference, --compile" not in lines
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["check_gpu.log", "summary.txt"]


def test_a_step_past_its_time_is_stopped(tmp_path):
    run = _check(*"--out c --device cpu --tiny --skip tests,compile --step-timeout 1".split(), cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    summary = (tmp_path / "c" / "summary.txt").read_text()
    assert summary.count("FAILED (exit 124)") == 2, summary  # the inference and the training benchmark


def test_ctrl_c_stops_the_check(tmp_path):
    """A step's Python took Ctrl-C as its own exit (130) and the script went on to the next step; with
    --step-timeout, ``timeout`` kept the signal from the step altogether."""
    env = {**os.environ, "PYTHON": sys.executable}
    out = tmp_path / "c"
    args = ["--out", str(out), *"--device cpu --tiny --skip tests,compile --step-timeout 300".split()]
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "check_gpu.sh"), *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ((out / "check_gpu.log").is_file() and "== inference" in (out / "check_gpu.log").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)  # the benchmark has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    summary = (out / "summary.txt").read_text()
    assert "inference benchmark: interrupted; the check stops here" in summary
    assert "training benchmark" not in summary and not (out / "bench_training.json").exists()


def test_a_relative_python_path_is_kept_after_the_cd(tmp_path):
    """PYTHON=relative/path broke every step (exit 127): the steps run in the repository root."""
    rel = os.path.relpath(sys.executable, tmp_path)
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_gpu.sh"), "--out", "c", "--device", "cpu", "--tiny", "--skip",
         "tests,compile,training", "--step-timeout", "1"],
        env={**os.environ, "PYTHON": rel}, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    summary = (tmp_path / "c" / "summary.txt").read_text()
    assert f"Python {os.path.abspath(os.path.join(tmp_path, rel))}" in summary
    assert "FAILED (exit 124)" in summary and run.returncode == 1  # it ran (and was stopped), not 127
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "check_gpu.sh"), "--out", "d", "--device", "cpu"],
        env={**os.environ, "PYTHON": "no/such/python"}, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.strip() == "error: PYTHON=no/such/python: no such Python"
