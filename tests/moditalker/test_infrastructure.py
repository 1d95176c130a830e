"""The homes the layout created: one checkpoint loader, one stage timer, repo paths, the frame-folder
reader/writer, idexp <-> lm3d as plain functions, and the import direction of the packages."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.face3d import idexp_to_lm3d, lm3d_to_idexp
from data.video import read_frame_folder, write_frame_folder
from moditalker.checkpoint import load_strict, read_checkpoint, unwrap_state_dict
from moditalker.errors import UserError
from moditalker.fileio import REPO_ROOT, repo_path
from moditalker.timing import StageTimer

REPO = Path(__file__).resolve().parents[2]


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_checkpoint_round_trip_with_wrappers_and_ddp_prefix(tmp_path):
    src, dst = _net(), _net()
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "c.pt")
    state = unwrap_state_dict(read_checkpoint(tmp_path / "c.pt", "test"), tmp_path / "c.pt")
    load_strict(dst, state, tmp_path / "c.pt", "test checkpoint")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_checkpoint_mismatch_is_one_line_with_counts(tmp_path):
    state = _net().state_dict()
    state["0.weight"] = torch.zeros(8, 5)  # other shape
    del state["2.bias"]  # missing
    state["extra.weight"] = torch.zeros(1)  # unexpected
    with pytest.raises(UserError) as info:
        load_strict(_net(), state, "x.pt", "test checkpoint", "hidden=8")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("test checkpoint x.pt does not match the configured model (hidden=8): ")
    assert "1 missing (e.g. 2.bias)" in msg and "1 unexpected (e.g. extra.weight)" in msg
    assert "1 with other shapes (e.g. 0.weight: (8, 5) vs (8, 4))" in msg


def test_checkpoint_missing_unreadable_and_empty(tmp_path):
    with pytest.raises(UserError, match=r"^test checkpoint not found: .*nope\.pt; see `python -m moditalker"):
        read_checkpoint(tmp_path / "nope.pt", "test")
    (tmp_path / "junk.pt").write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(UserError, match="cannot read test checkpoint") as info:
        read_checkpoint(tmp_path / "junk.pt", "test")
    assert "\n" not in str(info.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match="does not hold a state_dict"):
        unwrap_state_dict(read_checkpoint(tmp_path / "list.pt", "test"), tmp_path / "list.pt")


def test_checkpoint_of_non_tensors_or_non_string_keys_is_one_line(tmp_path):
    """A state_dict of floats or with integer keys is one line naming the file and what is wrong, from
    the reading (unwrap_state_dict) and from the loading (load_strict of a state given in memory)."""
    names = list(_net().state_dict())
    floats = tmp_path / "floats.pt"
    torch.save({k: 1.0 for k in names}, floats)
    with pytest.raises(UserError) as info:
        unwrap_state_dict(read_checkpoint(floats, "test"), floats)
    msg = "does not hold a state_dict of tensors: 4 values are not tensors (e.g. 0.weight: float)"
    assert str(info.value) == f"{floats} {msg}"
    ints = tmp_path / "ints.pt"
    torch.save({0: torch.zeros(1), "module.0.weight": torch.zeros(8, 4)}, ints)
    with pytest.raises(UserError) as info:
        unwrap_state_dict(read_checkpoint(ints, "test"), ints)
    assert (
        str(info.value)
        == f"{ints} does not hold a state_dict of tensors: 1 keys are not strings (e.g. 0: int)"
    )
    with pytest.raises(UserError) as info:
        load_strict(_net(), {k: 1.0 for k in names}, "x.pt", "test checkpoint")
    assert str(info.value) == f"test checkpoint x.pt {msg}"
    with pytest.raises(UserError) as info:
        load_strict(_net(), {0: torch.zeros(1), **_net().state_dict()}, "x.pt", "test checkpoint")
    assert str(info.value) == (
        "test checkpoint x.pt does not hold a state_dict of tensors: 1 keys are not strings (e.g. 0: int)"
    )
    with pytest.raises(
        UserError, match=r"^test checkpoint x.pt does not hold a state_dict \(it holds a list\)$"
    ):
        load_strict(_net(), [1, 2], "x.pt", "test checkpoint")
    # the layout check reports a value without a shape as shape () instead of failing
    from moditalker.checkpoint import mismatch

    assert mismatch({"w": (2, 3)}, {"w": 1.0}) == "1 with other shapes (e.g. w: () vs (2, 3))"


def test_stage_timer_accumulates_with_its_clock_and_logs():
    ticks = iter([0.0, 1.5, 10.0, 10.25])
    timings: dict[str, float] = {}
    lines: list[str] = []
    timer = StageTimer(timings, clock=lambda: next(ticks), log=lines.append)
    with timer("encode"):
        pass
    with timer("encode"):
        pass
    assert timings == {"encode": 1.75}
    assert lines == ["[encode] 1.50 s", "[encode] 0.25 s"]
    with StageTimer(None)("x"):  # no dict: a no-op
        pass


def test_repo_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert REPO_ROOT == REPO
    assert repo_path("configs/mtov_tiny.yaml") == REPO / "configs" / "mtov_tiny.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mtov_tiny.yaml").write_text("x: 1\n")
    assert repo_path("configs/mtov_tiny.yaml") == Path("configs/mtov_tiny.yaml")  # the working folder first
    assert repo_path(tmp_path / "a") == tmp_path / "a"


def test_frame_folder_round_trip_is_atomic_and_follows_umask(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    out = write_frame_folder(tmp_path / "f", frames)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    np.testing.assert_array_equal(read_frame_folder(out), frames)
    np.testing.assert_array_equal(read_frame_folder(out, max_frames=2), frames[:2])
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    with pytest.raises(UserError, match="already exists"):
        write_frame_folder(out, frames)
    chw = write_frame_folder(out, frames.transpose(0, 3, 1, 2), channels_first=True, overwrite=True)
    np.testing.assert_array_equal(read_frame_folder(chw), frames)
    gray = write_frame_folder(tmp_path / "g", frames[..., 0])
    np.testing.assert_array_equal(read_frame_folder(gray)[..., 1], frames[..., 0])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_frame_folder_errors(tmp_path):
    with pytest.raises(UserError, match="frames folder not found"):
        read_frame_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        read_frame_folder(tmp_path / "empty")
    write_frame_folder(tmp_path / "mixed", np.zeros((1, 4, 4, 3), np.uint8))
    write_frame_folder(tmp_path / "other", np.zeros((1, 6, 4, 3), np.uint8))
    os.replace(tmp_path / "other" / "00000.png", tmp_path / "mixed" / "00001.png")
    with pytest.raises(UserError, match="do not all have the same size"):
        read_frame_folder(tmp_path / "mixed")


def test_idexp_lm3d_plain_functions_numpy_and_torch():
    rng = np.random.default_rng(1)
    idexp = rng.normal(size=(5, 68, 3)).astype(np.float32)
    mean = rng.normal(size=(68, 3)).astype(np.float32)
    lm = idexp_to_lm3d(idexp, mean)
    np.testing.assert_allclose(lm, idexp / 10 + mean, rtol=0, atol=0)
    np.testing.assert_allclose(lm3d_to_idexp(lm, mean), idexp, atol=1e-5)
    t = idexp_to_lm3d(torch.from_numpy(idexp), torch.from_numpy(mean))
    assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), lm)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("moditalker", {"AToM", "MToV", "data", "pipeline", "benchmarks", "webapp"}),
        ("data", {"AToM", "MToV", "pipeline", "benchmarks", "webapp"}),
        ("AToM", {"MToV", "pipeline", "benchmarks", "webapp"}),
        ("MToV", {"AToM", "pipeline", "benchmarks", "webapp"}),
        ("pipeline", {"benchmarks", "webapp", "evaluation"}),  # its consumers import it, from above
        ("evaluation", {"AToM", "MToV", "benchmarks", "webapp"}),
        ("benchmarks", {"webapp"}),
        ("webapp", {"AToM", "MToV", "benchmarks", "evaluation"}),  # the page runs the pipeline only
    ],
)
def test_dependencies_point_one_way(package, forbidden):
    bad = {str(p.relative_to(REPO)): sorted(_imports(p) & forbidden) for p in (REPO / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_data_holds_only_preprocessing():
    infra = {"errors", "config", "fileio", "device", "assets", "launch", "run_state", "ema"}
    assert {p.stem for p in (REPO / "data").glob("*.py")} & infra == set()


def test_atomic_writes_follow_the_umask(tmp_path):
    """mkstemp's 0600 made every output unreadable to other users and web servers."""
    from moditalker.fileio import atomic_write_text, current_umask, save_npy

    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        atomic_write_text(tmp_path / "a.yaml", "x: 1\n")
        save_npy(tmp_path / "b.npy", np.zeros(2))
        assert (tmp_path / "a.yaml").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "b.npy").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "c.yaml", "x: 1\n")
        assert (tmp_path / "c.yaml").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_an_input_is_never_an_output(tmp_path, monkeypatch):
    from moditalker.fileio import check_output, same_file

    src = tmp_path / "speech.wav"
    src.write_bytes(b"RIFF")
    os.link(src, tmp_path / "hard.wav")
    (tmp_path / "sym.wav").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for out in (
        src,
        tmp_path / "hard.wav",
        tmp_path / "sym.wav",
        Path("speech.wav"),
        tmp_path / "x" / ".." / "speech.wav",
    ):
        with pytest.raises(UserError, match="is the input"):
            check_output(out, overwrite=True, inputs=[None, src])
    assert not same_file(tmp_path / "new.mp4", src)
    assert check_output(tmp_path / "new.mp4", inputs=[src]) == tmp_path / "new.mp4"
    assert src.read_bytes() == b"RIFF"


def test_damaged_checkpoints_get_their_own_line(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "drive.pth").write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:300])
    with open(tmp_path / "npy.pth", "wb") as f:
        np.save(f, np.zeros(3))
    cases = {
        "empty.pth": "the file is empty",
        "drive.pth": "a web page, not a checkpoint",
        "cut.pth": "truncated or damaged",
        "npy.pth": "not a checkpoint of plain tensors",
    }
    for name, words in cases.items():
        with pytest.raises(UserError, match=words) as info:
            read_checkpoint(tmp_path / name, "test")
        msg = str(info.value)
        assert "\n" not in msg and "weights_only" not in msg and len(msg) < 300, msg
    with pytest.raises(UserError, match="is a folder, not a checkpoint file"):
        read_checkpoint(tmp_path, "test")


PACKAGES = ("AToM", "MToV", "benchmarks", "data", "evaluation", "moditalker", "pipeline", "webapp")


def test_no_orchestration_module_is_huge():
    """Modules outside the network definitions stay readable (about 500 lines at most)."""
    networks = {"AToM/model.py"} | {str(p.relative_to(REPO)) for p in (REPO / "MToV" / "models").glob("*.py")}
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
    }
    assert {k: n for k, n in sizes.items() if n > 520 and k not in networks} == {}
