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


STAGE_SCRIPTS = sorted(
    p.name for p in (REPO / "scripts").glob("*.sh") if not p.name.startswith("_") and p.name != "setup.sh"
)


@pytest.mark.parametrize("script", [s for s in STAGE_SCRIPTS if s not in ("demo.sh", "test.sh")])
def test_every_launcher_answers_help_with_its_own_usage(script):
    """--help is help on every launcher (inference_atom.sh took it for its first file and exited 2), and
    the usage line names the script, not the Python module behind it. With $PYTHON set (``_run``) the
    launchers that set up .venv (scripts/_setup_python.sh) run that interpreter and set nothing up."""
    run = _run(script, "--help")
    assert run.returncode == 0, run.stderr
    first = next(line for line in run.stdout.splitlines() if line.strip())
    if script == "walkthrough_tiny.sh":  # its help is its header: what it does, then its usage
        assert "scripts/walkthrough_tiny.sh [OUT_DIR] [STEPS]" in run.stdout, run.stdout
    else:
        assert first.startswith(f"usage: scripts/{script} "), first


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


def test_setup_python_without_python_runs_setup_then_the_venv(tmp_path):
    """Without $PYTHON, scripts/_setup_python.sh runs scripts/setup.sh, then takes ROOT/.venv's Python."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text('echo "setup ran"\n')
    script = f'ROOT="{tmp_path}"; source "{REPO}/scripts/_setup_python.sh"; echo "PY=$PY"'
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["setup ran", f"PY={tmp_path}/.venv/bin/python"]
