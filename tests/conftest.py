"""Shared test fixtures: where the reference data lives, and the RUN_SLOW gate."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Never the user's cache folder: what MToV.calibration measures goes to a temp folder of this run
# (also in the subprocesses the tests start, which inherit the environment).
_CACHE_DIR = tempfile.mkdtemp(prefix="moditalker-test-cache-")
os.environ["MODITALKER_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, True)

REPO = Path(__file__).resolve().parents[1]
# The recorded reference data ships with the repository; MODITALKER_REFERENCE points elsewhere.
REFERENCE = Path(os.environ.get("MODITALKER_REFERENCE") or Path(__file__).resolve().parent / "reference")
FIXTURES = REFERENCE / "fixtures"
MANIFESTS = REFERENCE / "manifests"


@pytest.fixture(scope="session", autouse=True)
def _system_temp_under_pytest(tmp_path_factory):
    """What the code under test and its subprocesses put in the system temp folder (gradio_client's
    download folders, torchrun's logs, mkdtemp) goes under pytest's own temp folder instead, which
    pytest removes after a run that passed (tmp_path_retention_policy in pyproject.toml)."""
    folder = tmp_path_factory.mktemp("system_tmp")
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(folder)
    yield folder
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[1]


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; set RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE} (set MODITALKER_REFERENCE)")
    return REFERENCE


def load_fixture(name: str) -> dict:
    """Load ``reference/fixtures/<name>`` (plain tensors/dicts, safe with weights_only=True)."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"fixture missing: {path}")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    """An empty checkpoints folder ($MODITALKER_CHECKPOINTS) and an empty torch-hub cache: no weights
    anywhere, no fallback from the real ones."""
    from moditalker import assets

    root = tmp_path / "checkpoints"
    root.mkdir()
    monkeypatch.setenv("MODITALKER_CHECKPOINTS", str(root))
    monkeypatch.setattr(assets, "_torch_hub_checkpoints", lambda: tmp_path / "hub" / "checkpoints")
    return root


@pytest.fixture(scope="module")
def speech_and_photo(tmp_path_factory) -> dict[str, Path]:
    """A second of the sample speech ("speech") and the sample face photo ("photo"), made once a module."""
    from data.sample_data import write_reference_image, write_speech

    d = tmp_path_factory.mktemp("inputs")
    return {
        "speech": write_speech(d / "speech.wav", seconds=1.0),
        "photo": write_reference_image(d / "face.png"),
    }


@pytest.fixture()
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy shared CPU the OpenMP spin-wait
    of two threads made these runs ~10x slower; one thread keeps them well under a minute."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
