"""A copy of the repository that runs this test's Python environment, for the tests that run the
project's commands as a user would from a fresh clone: the docs' runnable blocks (test_docs.py) and the
recipe (test_recipe.py)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_files() -> list[str]:
    """The repository's files (tracked, and untracked ones git does not ignore), relative to it."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


def link_environment(root: Path) -> None:
    """``root/.venv``: this interpreter's environment seen from the copy, so that ``.venv/bin/python``
    and the scripts' launchers run it, and ``scripts/setup.sh`` finds it installed and leaves the
    real one alone. Its own folder, holding links into the environment and the install stamp."""
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    prefix = Path(sys.prefix)
    if (prefix / "pyvenv.cfg").is_file():  # a virtual environment (scripts/setup.sh makes one)
        shutil.copy2(prefix / "pyvenv.cfg", venv / "pyvenv.cfg")
        for name in ("lib", "lib64", "include"):
            if (prefix / name).exists():
                (venv / name).symlink_to(prefix / name)
        for exe in (prefix / "bin").iterdir():
            (venv / "bin" / exe.name).symlink_to(exe)
    else:  # e.g. a conda environment: its interpreter finds its own prefix through the link
        (venv / "bin" / "python").symlink_to(sys.executable)
    digest = hashlib.sha256((root / "requirements.txt").read_bytes() + (root / "pyproject.toml").read_bytes())
    (venv / ".moditalker-installed").write_text(digest.hexdigest() + "\n")


def copy_repository(root: Path) -> Path:
    """``root``: a copy of the repository's files (what a fresh clone of the working tree holds),
    running this test's Python environment as ``.venv``."""
    for rel in repo_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    link_environment(root)
    return root
