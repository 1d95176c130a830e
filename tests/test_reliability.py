"""The disk as an adversary: damaged cache entries and a full disk (tiny config, random weights).

* every cache entry is checked before it is trusted: a stage entry or an MToV batch with a missing,
  truncated, zeroed or changed file is computed again (a ``warning:`` line names it), and the run gives
  the mp4 of a clean run, byte for byte;
* (``RUN_SLOW=1``) a SIGKILL while the latent cache writes a video, and in an MToV autoencoder
  training step: the re-run gives the clean cache byte for byte, and the weights of an uninterrupted
  run;
* a full disk is one line, ``error: no space left on device while writing PATH (needs about N MB)``,
  exit 2, nothing at the output path, and the next run (with space) finishes with the clean run's mp4.
  Where the test runs as root and may mount one, the disk is a small tmpfs; otherwise ``ENOSPC`` is
  simulated in the writers.

The web page's cases are in tests/test_reliability_app.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moditalker.errors import DiskFullError, UserError, cli_main
from moditalker.fileio import atomic_path, save_npy, torch_save

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "inference_tiny.yaml")
CHEAP = ["--random_weights", "--config", TINY, "--mtov_steps", "4", "--steps", "1", "output.preset=ultrafast"]
FULL = re.compile(
    r"^error: no space left on device while writing (\S+) \((needs about \d+ MB|needs more than)"
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def inputs(speech_and_photo) -> dict[str, Path]:
    return speech_and_photo


def _argv(inputs, out: Path, *extra: str) -> list[str]:
    return [
        "--audio",
        str(inputs["speech"]),
        "--ref_image",
        str(inputs["photo"]),
        "--out",
        str(out),
        *CHEAP,
        *extra,
    ]


def _run(inputs, out: Path, *extra: str) -> list[str]:
    """The pipeline in-process (as scripts/inference.sh runs it); returns its log lines."""
    from pipeline.cli import build_parser
    from pipeline.inference import resolve_config, run_inference

    lines: list[str] = []
    run_inference(resolve_config(build_parser().parse_args(_argv(inputs, out, *extra))), log=lines.append)
    return lines


@pytest.fixture(scope="module")
def clean(inputs, tmp_path_factory) -> bytes:
    """The mp4 of a clean run."""
    out = tmp_path_factory.mktemp("clean") / "talk.mp4"
    _run(inputs, out)
    return out.read_bytes()


# ----------------------------------------------------------------------------- damaged cache entries
def test_damaged_cache_entries_are_recomputed_with_a_warning(inputs, clean, tmp_path):
    out = tmp_path / "talk.mp4"
    _run(inputs, out)
    work = out.with_name("talk_work")

    def entry(stage: str) -> Path:
        return next(p for p in work.glob(f"{stage}-*") if p.is_dir() and not p.name.endswith(".partial"))

    damage = {
        "reference": (
            "frames.npy",
            lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        ),  # truncated
        "hubert": ("hubert.npy", lambda p: p.write_bytes(bytes(p.stat().st_size))),  # zeroed, same size
        "align": (next(entry("align").glob("landmarks_png/*.png")).relative_to(entry("align")), os.unlink),
        "atom": ("frontal_lm3d.npy", _flip_last_byte),  # one byte changed
    }
    for stage, (name, hurt) in damage.items():
        hurt(entry(stage) / name)
    batch = sorted(entry("mtov").glob("batch-*.npz"))[-1]
    _flip_last_byte(batch)
    lines = _run(inputs, out, "--overwrite")
    warnings = [line for line in lines if line.startswith("warning:")]
    for stage, (name, _hurt) in damage.items():
        assert any(f"stage cache entry {stage}-" in w and Path(name).name in w for w in warnings), (
            stage,
            warnings,
        )
        assert any(line.startswith(f"[{stage}] computed") for line in lines), lines
    assert any(f"{entry('mtov').name}: {batch.name} has changed" in w for w in warnings), warnings
    assert any("continuing at frame" in line for line in lines), lines  # only the damaged batch again
    for stage in ("landmarks", "recon"):  # undamaged: reused
        assert any(line.startswith(f"[{stage}] reused") for line in lines), lines
    assert out.read_bytes() == clean
    # and a third run trusts everything again
    again = _run(inputs, out, "--overwrite")
    assert not [line for line in again if line.startswith("warning:")] and out.read_bytes() == clean
    assert sum(line.startswith(f"[{s}] reused") for line in again for s in damage) == len(damage)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_batch_store_checks_every_batch(tmp_path):
    """A batch recorded and then changed, one written by a killed run before it was recorded (kept when
    it reads back whole), and a recorded one that went missing."""
    from pipeline.cache import WorkCache
    from pipeline.stages.batches import BatchStore

    lines: list[str] = []
    store = BatchStore(WorkCache(tmp_path), "mtov", {"x": 1}, log=lines.append)
    assert store.open({"n": 4}) == 0
    for i in range(3):
        store.save(i, {"frames": np.full((2, 3), i, np.uint8)})
    (store.partial / BatchStore.RECORDS).write_text("{}")  # as if killed before any was recorded
    assert BatchStore(WorkCache(tmp_path), "mtov", {"x": 1}, log=lines.append).open({"n": 4}) == 3
    assert not lines  # unrecorded but whole: adopted
    _flip_last_byte(store.partial / "batch-00001.npz")
    again = BatchStore(WorkCache(tmp_path), "mtov", {"x": 1}, log=lines.append)
    assert again.open({"n": 4}) == 1 and "batch-00001.npz has changed" in lines[-1]
    assert not (store.partial / "batch-00002.npz").exists()  # the ones after it are made again too
    again.save(1, {"frames": np.full((2, 3), 1, np.uint8)})
    (store.partial / "batch-00001.npz").unlink()
    assert BatchStore(WorkCache(tmp_path), "mtov", {"x": 1}, log=lines.append).open({"n": 4}) == 1
    assert "batch-00001.npz is missing" in lines[-1]
    # a complete entry of the layout before batches (all frames in one frames.npy, no records): kept
    # while its frames.npy reads back whole, and recorded; a truncated one is computed again
    old = BatchStore(WorkCache(tmp_path), "mtov", {"x": 2}, log=lines.append)
    old.entry.mkdir()
    np.save(old.entry / "frames.npy", np.zeros((3, 3, 4, 4), np.uint8))
    (old.entry / ".done").write_text("[]")
    assert old.complete and old.problem() is None and "frames.npy" in (old.entry / ".done").read_text()
    (old.entry / ".done").write_text("[]")
    (old.entry / "frames.npy").write_bytes((old.entry / "frames.npy").read_bytes()[:-5])
    assert "without file hashes" in old.problem()


def test_stage_entry_of_an_older_layout_is_recomputed(tmp_path):
    from pipeline.cache import WorkCache

    cache, calls, lines = WorkCache(tmp_path), [], []

    def compute(folder: Path) -> dict:
        calls.append(folder)
        return {"x": np.arange(3)}

    cache.run("s", {"a": 1}, compute, lines.append)
    entry = next(tmp_path.glob("s-*"))
    (entry / ".done").write_text('["x"]')  # no file records: written before they existed
    arrays, _ = cache.run("s", {"a": 1}, compute, lines.append)
    assert len(calls) == 2 and "without file hashes" in lines[-2] and lines[-2].startswith("warning:")
    np.testing.assert_array_equal(arrays["x"], np.arange(3))
    (entry / ".done").write_text("{not json")
    cache.run("s", {"a": 1}, compute, lines.append)
    assert len(calls) == 3 and ".done record cannot be read" in lines[-2]
    cache.run("s", {"a": 1}, compute, lines.append)
    assert len(calls) == 3 and "reused" in lines[-1]
    shutil.rmtree(entry)
    entry.write_text("a file where the entry's folder goes")  # not a folder: replaced by the entry
    arrays, _ = cache.run("s", {"a": 1}, compute, lines.append)
    assert len(calls) == 4 and entry.is_dir() and (entry / ".done").is_file()


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_text('{"n": '),  # cut short
        lambda p: p.write_bytes(bytes(range(256))),  # not text
        lambda p: (p.unlink(), p.mkdir()),  # a folder in its place
    ],
)
def test_batch_store_with_an_unreadable_layout_starts_again(tmp_path, damage):
    """layout.json that cannot be read is a layout that does not match: the partial folder is emptied
    and the batches computed again (it was read unguarded: every rerun ended in a traceback)."""
    from pipeline.cache import WorkCache
    from pipeline.stages.batches import BatchStore

    store = BatchStore(WorkCache(tmp_path), "mtov", {"x": 1})
    assert store.open({"n": 2}) == 0
    store.save(0, {"frames": np.zeros((2, 3), np.uint8)})
    damage(store.partial / "layout.json")
    again = BatchStore(WorkCache(tmp_path), "mtov", {"x": 1})
    assert again.open({"n": 2}) == 0 and not (again.partial / "batch-00000.npz").exists()
    assert json.loads((again.partial / "layout.json").read_text()) == {"n": 2}
    (again.partial / BatchStore.RECORDS).unlink()
    (again.partial / BatchStore.RECORDS).mkdir()  # a folder where the records go: removed
    third = BatchStore(WorkCache(tmp_path), "mtov", {"x": 1})
    assert third.open({"n": 2}) == 0 and (third.partial / BatchStore.RECORDS).is_file()
    third.save(0, {"frames": np.zeros((2, 3), np.uint8)})
    assert BatchStore(WorkCache(tmp_path), "mtov", {"x": 1}).open({"n": 2}) == 1


def test_synthetic_face_model_of_the_work_folder_is_written_again_when_damaged(tmp_path):
    from data.face3d import synthetic_bfm_problem, write_synthetic_bfm

    folder = write_synthetic_bfm(tmp_path / "bfm", seed=3)
    assert synthetic_bfm_problem(folder) is None
    good = (folder / "BFM_model_front.mat").stat().st_size
    (folder / "BFM_model_front.mat").write_bytes(b"MATLAB 5.0" + bytes(50))
    assert "BFM_model_front.mat cannot be read" in synthetic_bfm_problem(folder)
    (folder / "similarity_Lm3D_all.mat").unlink()
    write_synthetic_bfm(folder, seed=3)
    assert synthetic_bfm_problem(folder) is None and (folder / "BFM_model_front.mat").stat().st_size == good


# ----------------------------------------------------------------------------- a full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_writers_turn_a_full_disk_into_one_error_and_leave_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "a" / "x.npy"

    def half_then_full(file, array, *args, **kwargs):
        file.write(b"\x93NUMPY" + bytes(3_000_000))
        _enospc()

    monkeypatch.setattr(np, "save", half_then_full)
    with pytest.raises(DiskFullError, match=r"while writing .*x\.npy \(needs more than 4 MB\)"):
        save_npy(out, np.zeros(3))
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"PK" + bytes(10)), _enospc()))
    with pytest.raises(DiskFullError, match=r"while writing .*w\.pt"):
        torch_save({"w": 1}, tmp_path / "a" / "w.pt")
    assert list(out.parent.iterdir()) == []

    from data.video import VideoWriter

    writer = VideoWriter(tmp_path / "v" / "out.mp4", 32, 32, tmp_dir=tmp_path / "v")
    container = writer.container

    class Full:  # the muxer's write fails as on a full disk
        mux = staticmethod(_enospc)
        close = container.close

    writer.container = Full()
    with pytest.raises(DiskFullError, match=r"while writing .*out\.mp4 \(needs more"):
        writer.write(np.zeros((2, 32, 32, 3), np.uint8))
    assert list((tmp_path / "v").iterdir()) == []  # the temp file is gone too

    def main(argv):  # a command whose writer raised the bare OSError
        with atomic_path(tmp_path / "b" / "out.txt") as tmp:
            tmp.write_text("part")
            _enospc()

    def bare(argv):
        raise RuntimeError("wrapped") from OSError(errno.ENOSPC, "No space left on device", "/x/y.bin")

    for command, path in ((main, str(tmp_path / "b" / "out.txt")), (bare, "/x/y.bin")):
        with pytest.raises(SystemExit) as exc:
            cli_main(command, [])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: no space left on device while writing {path} (needs "), err
    assert list((tmp_path / "b").iterdir()) == []


@contextlib.contextmanager
def _small_disk(folder: Path, mb: float):
    """A tmpfs of ``mb`` MB at ``folder`` (root only); yields a function that resizes it, or None where
    no tmpfs can be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(mb * 1024)}k", "tmpfs", str(folder)], capture_output=True
    )
    if mount.returncode != 0:
        yield None
        return

    def resize(new_mb: float) -> None:
        subprocess.run(["mount", "-o", f"remount,size={int(new_mb * 1024)}k", str(folder)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _cli(inputs, out: Path, capsys) -> list[str]:
    from pipeline.inference import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(main, _argv(inputs, out))
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert exc.value.code == 2 and len(err) == 1 and FULL.match(err[0]), text  # (the rest: progress bars)
    assert text.rstrip().endswith(err[0])
    return err


def test_a_full_disk_during_a_render_is_one_line_and_the_next_run_finishes(inputs, clean, tmp_path, capsys,
                                                                         monkeypatch):  # fmt: skip
    out = tmp_path / "disk" / "talk.mp4"
    with _small_disk(out.parent, 1.5) as resize:
        if resize is None:  # no tmpfs: the disk fills while the reference frames are stored
            import pipeline.stages.reference as reference

            monkeypatch.setattr(reference, "save_frames", _enospc)
        err = _cli(inputs, out, capsys)  # 1.5 MB: full while a stage entry is written
        assert "talk_work/" in err[0] and not out.exists()
        work = out.with_name("talk_work")
        assert not list(work.glob(".*")) and not list(out.parent.glob(".talk*"))  # no temp left
        if resize is not None:
            resize(2.5)  # the stages fit, the MToV frames do not: refused before they are generated
            err = _cli(inputs, out, capsys)
            assert re.search(r"mtov-\w+\.partial \(needs about [5-9] MB, [01] MB free\)", err[0]), err
            assert not out.exists() and not list(work.glob("mtov-*.partial/batch-*"))
            resize(64)
        else:
            monkeypatch.undo()
        lines = _run(inputs, out)  # with space: no manual cleaning, the clean run's mp4
        assert not [line for line in lines if line.startswith("warning:")], lines
        assert out.read_bytes() == clean


def test_a_full_disk_error_from_the_page_names_no_server_folder(tmp_path):
    from webapp.job import public_text

    message = str(DiskFullError(tmp_path / "app" / "work" / "shared" / "mtov-1.partial", needs=5.2e6, free=0))
    assert (
        public_text(message)
        == "no space left on device while writing mtov-1.partial (needs about 6 MB, 0 MB free)"
    )
    assert isinstance(DiskFullError("x"), UserError)


# ----------------------------------------------------------------------------- the latent cache
@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A tiny latent cache (3 synthetic videos, random autoencoders) and the command that builds it."""
    from accelerate.utils import set_seed
    from mtov_synth import write_synthetic_hdtf

    from moditalker.config import load_config
    from MToV import cache_latents
    from MToV.loading import build_models
    from MToV.train_diffusion import DEFAULTS

    torch.set_num_threads(1)  # one thread in every build: bit-identical encodes
    root = tmp_path_factory.mktemp("latents")
    tiny = str(REPO / "configs" / "mtov_tiny.yaml")
    info = write_synthetic_hdtf(root / "hdtf", ids=("WDA_A_000", "WDA_B_000", "RD_C_000"),
                                heldout=("RD_C_000",), n_frames=[10, 9, 8])  # fmt: skip
    set_seed(0)
    ae, _, _ = build_models(load_config(tiny, (), DEFAULTS))
    torch.save(ae.state_dict(), root / "ae.pth")
    args = ["--config", tiny, "--device", "cpu", "--no_progress", "--batch_size", "1"]
    args += ["--ae_rgb", str(root / "ae.pth"), "--ae_ldmk", str(root / "ae.pth")]
    args += [f"data.root={info.root}", f"data.split_file={info.split_file}"]

    (root / "argv.json").write_text(json.dumps(args))

    def build(out: Path) -> dict:
        return cache_latents.main([*args, "--out", str(out)])

    build(root / "clean")
    return root, build


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_latent_cache_damaged_videos_are_built_again(latents, tmp_path, capsys):
    from MToV.latents import LatentCache

    root, build = latents
    out = tmp_path / "cache"
    shutil.copytree(root / "clean", out)
    videos = out / "videos"
    _flip_last_byte(videos / "WDA_A_000" / "z.npy")  # changed
    ref = videos / "WDA_B_000" / "ref.npy"
    ref.write_bytes(ref.read_bytes()[:-8])  # truncated
    with pytest.raises(UserError, match=r"WDA_B_000.*ref\.npy has \d+ bytes, \d+ recorded; rerun"):
        LatentCache(out).window("WDA_B_000", 0)  # training refuses it (sizes checked on open)
    capsys.readouterr()
    result = build(out)
    err = capsys.readouterr().err
    assert "warning: latent cache video WDA_A_000: z.npy has changed" in err
    assert "warning: latent cache video WDA_B_000: ref.npy is truncated" in err
    assert result["built"] == 2 and _tree(out) == _tree(root / "clean")
    # a video of an older build (no records): checked by its headers and sizes, then recorded
    meta = json.loads((videos / "RD_C_000" / "video.json").read_text())
    older = {k: v for k, v in meta.items() if k != "files"}
    (videos / "RD_C_000" / "video.json").write_text(json.dumps(older))
    assert build(out)["built"] == 0 and json.loads((videos / "RD_C_000" / "video.json").read_text()) == meta


def test_latent_cache_full_disk_is_one_line_before_and_while_building(latents, tmp_path, monkeypatch, capsys):
    import moditalker.errors
    from MToV import cache_latents

    root, build = latents
    out = tmp_path / "cache"
    monkeypatch.setattr(moditalker.errors, "free_bytes", lambda folder: 1000)
    with pytest.raises(DiskFullError, match=r"while writing .*videos \(needs about 1 MB, 1 MB free\)"):
        build(out)  # checked before the first window: nothing built
    assert not list((out / "videos").glob("*")) if (out / "videos").exists() else True
    monkeypatch.undo()
    calls = []

    def fallocate(fd, offset, length):  # the disk fills while the second video allocates its blocks
        calls.append(length)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_latents.os, "posix_fallocate", fallocate)
    with pytest.raises(DiskFullError, match=r"while writing .*videos/WDA_B_000 \(needs about 1 MB\)"):
        build(out)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["WDA_A_000"]  # no half-written video
    monkeypatch.undo()
    build(out)
    assert _tree(out) == _tree(root / "clean")


# ----------------------------------------------------------------------------- kill -9 anywhere
def _kill_when(argv: list[str], ready, timeout: float = 600) -> None:
    """Run ``python ARGV`` and SIGKILL it as soon as ``ready()`` holds (it must not end before)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the command ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_latent_cache_killed_while_writing_a_video_resumes_to_the_clean_cache(latents, tmp_path):
    root, build = latents
    out = tmp_path / "killed"
    args = json.loads((root / "argv.json").read_text())
    _kill_when(
        ["-m", "MToV.cache_latents", *args, "--out", str(out)], lambda: any(out.glob("videos/*.tmp-*"))
    )
    assert not (out / "manifest.json").exists()
    result = build(out)
    assert result["complete"] and 1 <= result["built"] <= 3
    assert _tree(out) == _tree(root / "clean")


@pytest.mark.slow
def test_mtov_autoencoder_killed_in_a_training_step_resumes_to_the_same_weights(tmp_path):
    """SIGKILL after the state of step 2 was saved (in step 3 or later): the re-run's weights equal an
    uninterrupted run's, bit for bit."""
    from mtov_synth import write_synthetic_hdtf

    from MToV.train_autoencoder import main

    torch.set_num_threads(1)
    data = write_synthetic_hdtf(tmp_path / "hdtf", ids=("WDA_Synth0_000", "WDA_Synth1_000"), heldout=())
    text = (REPO / "configs" / "mtov_autoencoder_tiny.yaml").read_text()
    config = tmp_path / "ae16.yaml"
    config.write_text(text.replace("    resolution: 32", "    resolution: 16", 1))
    common = ["--config", str(config), "--no_progress", f"data.root={data.root}", "loss.perceptual_weight=0",
              "train.save_every=2", "train.val_every=2", "train.max_steps=8"]  # fmt: skip
    main([*common, "--out_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"

    def after_step_2() -> bool:
        state = killed / "state" / "trainer.json"
        return state.is_file() and json.loads(state.read_text())["step"] >= 2

    _kill_when(["-m", "MToV.train_autoencoder", *common, "--out_dir", str(killed)], after_step_2)
    step = json.loads((killed / "state" / "trainer.json").read_text())["step"]
    assert 2 <= step < 8
    result = main([*common, "--out_dir", str(killed)])
    assert result["step"] == 8
    a = torch.load(tmp_path / "straight" / "model_last.pth", weights_only=True)
    b = torch.load(killed / "model_last.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_in_training_is_one_line_and_the_rerun_trains_the_same_weights(tmp_path, capsys):
    """The MToV autoencoder trainer on a 12 MB disk: its checkpoints fit, its accelerate state does not
    (torch.save and safetensors report that as a RuntimeError); with space the same command finishes
    with the weights of a run that never hit the full disk."""
    from mtov_synth import write_synthetic_hdtf

    from MToV.train_autoencoder import main

    data = write_synthetic_hdtf(tmp_path / "hdtf", ids=("WDA_Synth0_000",), heldout=())
    text = (REPO / "configs" / "mtov_autoencoder_tiny.yaml").read_text()
    config = tmp_path / "ae16.yaml"
    config.write_text(text.replace("    resolution: 32", "    resolution: 16", 1))
    common = ["--config", str(config), "--no_progress", f"data.root={data.root}", "loss.perceptual_weight=0",
              "train.save_every=2", "train.val_every=2", "train.max_steps=2"]  # fmt: skip
    main([*common, "--out_dir", str(tmp_path / "straight")])
    out = tmp_path / "disk" / "run"
    with _small_disk(out.parent, 12) as resize:
        if resize is None:
            pytest.skip("no tmpfs here (not root, or mount refused); simulated ENOSPC is tested above")
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli_main(main, [*common, "--out_dir", str(out)])
        text = capsys.readouterr().err
        lines = [line for line in text.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert exc.value.code == 2 and len(lines) == 1 and FULL.match(lines[0]), text
        assert lines[0].split(" while writing ")[1].startswith(str(out / "state")), lines
        assert not (out / "state.tmp").exists() and not (out / "state").exists()
        resize(64)
        assert main([*common, "--out_dir", str(out)])["step"] == 2
        a = torch.load(tmp_path / "straight" / "model_last.pth", weights_only=True)
        b = torch.load(out / "model_last.pth", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- evaluation protocol videos
@pytest.fixture(scope="module")
def protocol_data(tmp_path_factory):
    """Two 1 s ids with speech and a split file (as tests/evaluation/test_protocols.py makes them)."""
    from data.audio import load_audio
    from data.sample_data import reference_frames, write_speech
    from data.video import write_video

    root = tmp_path_factory.mktemp("protocol")
    speech = load_audio(write_speech(root / "speech.wav", 2.0))
    frames = reference_frames(25)
    (root / "data").mkdir()
    write_video(root / "data" / "id_a.mp4", frames, audio=speech[:16000])
    write_video(root / "data" / "id_b.mp4", frames[::-1], audio=speech[16000:])
    (root / "split.txt").write_text("id_a\nid_b\n")
    return root


def _protocol_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--protocol", "hdtf_selfrecon", "--data", str(root / "data"), "--out", str(out), "--config", TINY,
            "--random_weights", "--device", "cpu", "--seconds", "0.6", "--no_progress", "--metrics", "psnr",
            "--split_file", str(root / "split.txt"), *extra]  # fmt: skip


def _outputs(out: Path) -> dict[str, bytes]:
    """The protocol's audio, real and generated clips (not the configs beside them: they name ``out``)."""
    kinds = ("audio/*.wav", "real/*.mp4", "generated/*.mp4")
    return {str(p.relative_to(out)): p.read_bytes() for k in kinds for p in out.glob(k)}


@pytest.fixture(scope="module")
def protocol_clean(protocol_data, tmp_path_factory):
    from evaluation.evaluate import main

    out = tmp_path_factory.mktemp("protocol_clean") / "out"
    report = main(_protocol_argv(protocol_data, out))
    return _outputs(out), report["metrics"]


def test_protocol_videos_are_checked_before_they_are_reused(protocol_data, protocol_clean, tmp_path, capsys):
    from evaluation.evaluate import main

    out = tmp_path / "out"
    main(_protocol_argv(protocol_data, out))
    records = json.loads((out / "protocol.json").read_text())["files"]
    assert set(records) == {"id_a", "id_b"} and "generated/id_a.mp4" in records["id_a"]
    _flip_last_byte(out / "generated" / "id_a.mp4")
    (out / "real" / "id_b.mp4").write_bytes((out / "real" / "id_b.mp4").read_bytes()[:1000])
    capsys.readouterr()
    report = main(_protocol_argv(protocol_data, out, "--json", str(out / "again.json")))
    err = capsys.readouterr().err
    assert "warning: id_a: generated/id_a.mp4 has changed" in err, err
    assert "warning: id_b: real/id_b.mp4 is truncated" in err, err
    assert sorted(report["settings"]["generation"]["generated"]) == ["id_a", "id_b"]
    assert _outputs(out) == protocol_clean[0] and report["metrics"] == protocol_clean[1]
    report = main(_protocol_argv(protocol_data, out, "--json", str(out / "third.json")))
    assert report["settings"]["generation"]["reused"] == ["id_a", "id_b"]


@pytest.mark.slow
def test_protocol_killed_while_generating_resumes_to_the_same_videos(protocol_data, protocol_clean, tmp_path):
    from evaluation.evaluate import main

    out = tmp_path / "out"
    second = out / "logs" / "id_b.log"  # id_a is finished, id_b is being generated
    _kill_when(["-m", "evaluation.evaluate", *_protocol_argv(protocol_data, out)], second.is_file)
    assert not (out / "report.json").exists()
    report = main(_protocol_argv(protocol_data, out))
    assert report["settings"]["generation"]["reused"] == ["id_a"]
    assert _outputs(out) == protocol_clean[0] and report["metrics"] == protocol_clean[1]


# ----------------------------------------------------------------------------- preprocessing outputs
@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """Two 1 s reference videos preprocessed (random networks, 6 frames each): the clean tree."""
    from data.preprocess import main
    from data.sample_data import write_reference_video

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("preprocess")
    (root / "videos").mkdir()
    for name in ("WRA_One_000", "WRA_Two_000"):
        write_reference_video(root / "videos" / f"{name}.mp4", seconds=1.0)

    def argv(out: Path) -> list[str]:
        return ["hdtf", "--videos", str(root / "videos"), "--out_dir", str(out), "--random_weights",
                "--device", "cpu", "--max_frames", "6", "--frame_format", "png"]  # fmt: skip

    main(argv(root / "clean"))
    return root, argv


def _item_tree(out: Path) -> dict[str, bytes]:
    """The preprocessed files (meta/*.json without its timing; not configs/ and the random networks'
    synthetic BFM: they hold paths and a date)."""
    tree = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if not p.is_file() or rel.startswith(("configs", "random_weights")):
            continue
        if rel.startswith("meta/"):
            meta = json.loads(p.read_text())
            tree[rel] = json.dumps({k: v for k, v in meta.items() if k not in ("seconds", "source")}).encode()
        else:
            tree[rel] = p.read_bytes()
    return tree


def test_preprocessed_items_are_checked_before_a_rerun_skips_them(preprocessed, tmp_path, capsys):
    from data.preprocess import main

    root, argv = preprocessed
    out = tmp_path / "out"
    shutil.copytree(root / "clean", out)
    meta = json.loads((out / "meta" / "WRA_One_000.json").read_text())
    assert "coeff/WRA_One_000.npy" in meta["files"] and any(
        k.startswith("frames/WRA_One_000/") for k in meta["files"]
    )
    coeff = out / "coeff" / "WRA_One_000.npy"
    coeff.write_bytes(coeff.read_bytes()[:-4])  # truncated
    _flip_last_byte(sorted((out / "frames" / "WRA_Two_000").glob("*.png"))[2])  # a changed frame
    (out / "coeff" / ".WRA_One_000.npy.k1ll3d.npy").write_bytes(b"cut short")  # temp files of a kill
    (out / "frames" / ".WRA_One_000.k1ll3d").mkdir()
    capsys.readouterr()
    report = main(argv(out))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "warning: WRA_One_000: coeff/WRA_One_000.npy is truncated" in text, text
    assert "warning: WRA_Two_000: frames/WRA_Two_000/00002.png has changed" in text, text
    assert sorted(report["done"]) == ["WRA_One_000", "WRA_Two_000"]
    assert _item_tree(out) == _item_tree(root / "clean")
    assert main(argv(out))["skipped"] == ["WRA_One_000", "WRA_Two_000"]


@pytest.mark.slow
def test_preprocessing_killed_mid_item_resumes_to_the_clean_tree(preprocessed, tmp_path):
    from data.preprocess import main

    root, argv = preprocessed
    out = tmp_path / "out"
    started = lambda: any(out.glob("frames/*/*.png")) or any(out.glob("frames/.*"))  # noqa: E731
    _kill_when(["-m", "data.preprocess", *argv(out)], started)
    main(argv(out))
    assert _item_tree(out) == _item_tree(root / "clean")
