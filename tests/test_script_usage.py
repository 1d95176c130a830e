"""The scripts/*.sh launchers name themselves in their usage lines, and take --help as help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}  # no scripts/setup.sh run from here
    env.pop("MODITALKER_PROG", None)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.parametrize("script", ["inference.sh", "train_atom.sh", "preprocess_lrs3.sh"])
def test_help_names_the_script(script):
    run = _run(script, "--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: scripts/{script} "), run.stdout[:200]


def test_usage_error_names_the_script():
    run = _run("inference.sh", "--audio")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: argument --audio: expected one argument (see scripts/inference.sh --help)"
    )


@pytest.mark.parametrize("module", ["pipeline", "pipeline.inference"])
def test_python_module_keeps_its_own_name(module):
    env = {k: v for k, v in os.environ.items() if k != "MODITALKER_PROG"}
    run = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert run.returncode == 0 and run.stdout.startswith(f"usage: python -m {module} ")
    assert "--batch_file" in run.stdout


def test_walkthrough_help_is_help_not_a_folder(tmp_path):
    run = _run("walkthrough_tiny.sh", "--help")
    assert run.returncode == 0 and "scripts/walkthrough_tiny.sh [OUT_DIR] [STEPS]" in run.stdout
    assert not (REPO / "--help").exists()
    bad = _run("walkthrough_tiny.sh", str(tmp_path / "w"), "many")
    assert bad.returncode == 2 and "STEPS must be a positive integer, got 'many'" in bad.stderr
    assert not (tmp_path / "w").exists()
