"""scripts/_allocator.sh (tcmalloc preloaded by the launchers where it is installed) and
moditalker.device.allocator (what the process really runs with)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_TCMALLOC = [
    p
    for p in (
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib64/libtcmalloc_minimal.so.4",
        "/usr/lib/libtcmalloc_minimal.so.4",
    )
    if os.path.isfile(p)
]


def _preload(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MODITALKER_TCMALLOC", "CONDA_PREFIX")
    }
    env.update(env_extra)
    script = f'source "{ROOT}/scripts/_allocator.sh"; echo "LD_PRELOAD=${{LD_PRELOAD:-}}"'
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)


def test_launcher_choice(tmp_path):
    off = _preload({"MODITALKER_TCMALLOC": "0"})
    assert off.returncode == 0 and off.stdout.strip() == "LD_PRELOAD="
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    given = _preload({"MODITALKER_TCMALLOC": str(lib)})
    assert given.returncode == 0 and given.stdout.strip() == f"LD_PRELOAD={lib}"
    kept = _preload({"LD_PRELOAD": "/some/other.so", "MODITALKER_TCMALLOC": str(lib)})
    assert kept.stdout.strip() == "LD_PRELOAD=/some/other.so"  # the user's own preload wins
    (tmp_path.parent / "lib").mkdir(exist_ok=True)
    (tmp_path.parent / "lib" / lib.name).write_bytes(b"")
    conda = _preload({"CONDA_PREFIX": str(tmp_path.parent)})
    assert conda.stdout.strip() == f"LD_PRELOAD={tmp_path.parent / 'lib' / lib.name}"  # conda's first
    found = _preload({})
    expected = SYSTEM_TCMALLOC[0] if SYSTEM_TCMALLOC else ""
    assert found.returncode == 0 and found.stdout.strip() == f"LD_PRELOAD={expected}"
    missing = _preload({"MODITALKER_TCMALLOC": str(tmp_path / "nope.so")})
    assert missing.returncode == 2 and missing.stdout == ""
    lines = missing.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: MODITALKER_TCMALLOC=") and "no such file" in lines[0]
    )


def _allocator_in(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | env_extra
    code = "from moditalker.device import allocator; print(allocator())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_allocator_reports_what_is_loaded():
    assert _allocator_in({}) == "default"
    if not SYSTEM_TCMALLOC:
        pytest.skip("tcmalloc is not installed (Debian/Ubuntu: libtcmalloc-minimal4)")
    assert _allocator_in({"LD_PRELOAD": SYSTEM_TCMALLOC[0]}) == "tcmalloc"
