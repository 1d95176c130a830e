"""The streamed pipeline: any length in bounded memory, --start/--duration, and a killed run resumed
(tiny config, random weights).

The memory tests measure the peak RSS of a child process (``getrusage(RUSAGE_SELF)`` in the child, at
its end) for a long and a short audio with the same reference and settings; the default suite
compares 90 s with 15 s, ``RUN_SLOW=1`` also 3 min with 30 s.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.sample_data import write_reference_video, write_speech
from data.video import probe, write_video
from moditalker.errors import cli_main
from pipeline.cli import build_parser
from pipeline.inference import main, resolve_config, run_inference
from pipeline.stages.batches import BatchStore

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "inference_tiny.yaml")
#: the tiny config made cheaper still (one UNet pass per clip, one AToM step): memory and resume do
#: not depend on the step counts
CHEAP = ["--random_weights", "--config", TINY, "--mtov_steps", "4", "--steps", "1", "output.preset=ultrafast"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("stream_inputs")
    return {
        "speech": write_speech(d / "speech4s.wav", seconds=4.0),
        "video": write_reference_video(d / "ref3s.mp4", seconds=3.0),
        "dir": d,
    }


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _argv(audio: Path, ref: Path, out: Path, *extra: str) -> list[str]:
    return ["--audio", str(audio), "--ref_video", str(ref), "--out", str(out), *CHEAP, *extra]


def _batches(work: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(work / "mtov-*" / "batch-*.npz")))


def _frames(work: Path) -> np.ndarray:
    return np.concatenate([np.load(p)["frames"] for p in _batches(work)])


# ----------------------------------------------------------------------------- lengths, --start/--duration
def test_any_length_within_half_a_frame_and_start_duration(inputs, tmp_path, one_thread):
    """Parts of a 4 s speech (0.6 s to 4 s, odd lengths and offsets): the mp4 has round(25 * seconds)
    frames (within half a frame of the audio) and carries that part of the audio; the streamed mp4
    is byte for byte write_video of the frames."""
    out = tmp_path / "part.mp4"
    work = tmp_path / "work"
    cases = [(None, None, 4.0), ("0", "0.6", 0.6), ("0.37", "1.013", 1.013), ("2.5", None, 1.5)]
    for start, duration, seconds in cases:
        extra = ["--overwrite", "--work_dir", str(work)]
        extra += ["--start", start] if start else []
        extra += ["--duration", duration] if duration else []
        result = main(_argv(inputs["speech"], inputs["video"], out, *extra))
        info = probe(out)
        assert abs(result.audio_seconds - seconds) < 1e-4
        assert info["video"]["frames"] == result.n_frames == round(seconds * 25)
        assert abs(info["video"]["frames"] / 25 - seconds) <= 0.5 / 25 + 1e-9  # within half a frame
        assert abs(info["audio"]["duration"] - seconds) <= 1 / 25 + 1e-6
    # the last part (2.5 s to the end): its frames written at once give the same file
    from data.audio import load_audio
    from pipeline.stages.output import metadata

    entries = [p for p in work.glob("mtov-*") if p.is_dir()]
    assert len(entries) == len(cases)  # one entry per part: their keys differ
    last = max(entries, key=lambda p: (p / ".done").stat().st_mtime_ns)
    frames = np.concatenate([np.load(p)["frames"] for p in sorted(last.glob("batch-*.npz"))])
    cfg = resolve_config(build_parser().parse_args(_argv(inputs["speech"], inputs["video"], out)))
    again = write_video(
        tmp_path / "again.mp4",
        frames.transpose(0, 2, 3, 1),
        audio=load_audio(inputs["speech"])[40000:],
        metadata=metadata(cfg),
        preset="ultrafast",
    )
    assert again.read_bytes() == out.read_bytes()


def test_start_past_the_end_and_too_short_a_part(inputs, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    for extra, message in [
        (["--start", "4.5"], "--start 4.5 s is past the end of"),
        (["--start", "1", "--duration", "0.2"], "the part of"),
        (["--duration", "0"], "duration must be > 0"),
        (["--start", "-1"], "start must be >= 0"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli_main(main, _argv(inputs["speech"], inputs["video"], out, *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert message in err[0], err[0]
        assert not out.exists() and not (tmp_path / "o_work").exists()


# ----------------------------------------------------------------------------- the batch store
def test_batch_store_resumes_in_order_and_finishes_atomically(tmp_path):
    from pipeline.cache import WorkCache

    cache = WorkCache(tmp_path)
    store = BatchStore(cache, "mtov", {"x": 1})
    assert store.open({"n": 3}) == 0 and not store.complete
    store.save(0, {"frames": np.zeros((2, 3), np.uint8)})
    store.save(2, {"frames": np.ones((2, 3), np.uint8)})  # 1 missing: only batch 0 counts as done
    (store.partial / ".batch-00001.npz.abc.npz").write_bytes(b"cut short by a kill")
    again = BatchStore(cache, "mtov", {"x": 1})
    assert again.open({"n": 3}) == 1 and not list(store.partial.glob(".batch-*"))
    assert again.load(0, ("frames", "nothing")).keys() == {"frames"}
    assert BatchStore(cache, "mtov", {"x": 1}).open({"n": 4}) == 0  # another layout: emptied
    store.save(0, {"frames": np.zeros((2, 3), np.uint8)})
    store.finish()
    assert store.complete and not store.partial.exists() and store.count() == 1
    assert store.entry.name == f"mtov-{store.key}" and (store.entry / "parts.json").is_file()


# ----------------------------------------------------------------------------- kill -9 and resume
def test_killed_run_resumes_at_the_last_finished_batch(inputs, tmp_path, one_thread):
    """kill -9 while MToV runs: nothing at the output path; the same command again continues at the
    first missing batch (the log says where), leaves every finished batch file as it was, and gives the
    frames, mp4 and preview of a run that was never interrupted."""
    speech = write_speech(tmp_path / "speech8s.wav", seconds=8.0)  # 200 frames: 25 clips of 8
    out = tmp_path / "killed" / "talk.mp4"
    argv = _argv(speech, inputs["video"], out, "--batch_size", "1", "--preview")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.inference", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = out.with_name("talk_work")
    deadline = time.monotonic() + 600
    try:
        while len(list(work.glob("mtov-*.partial/batch-*.npz"))) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("mtov-*.partial/batch-*")}
    assert len(finished) >= 3 and not out.exists() and not out.with_name("talk_preview.mp4").exists()
    assert not list(out.parent.glob(".talk*"))  # temp files are in the work folder, not beside the output

    # an uninterrupted run for comparison: the same stages up to MToV (copied), MToV from scratch
    whole = tmp_path / "whole" / "talk.mp4"
    shutil.copytree(work, whole.with_name("talk_work"), ignore=shutil.ignore_patterns("mtov-*", ".*"))
    main(_argv(speech, inputs["video"], whole, "--batch_size", "1", "--preview"))

    lines: list[str] = []
    cfg = resolve_config(build_parser().parse_args(argv))
    result = run_inference(cfg, log=lines.append, progress=False)
    k = len(finished)
    resumed = [line for line in lines if "resuming" in line]
    assert resumed and f"{k} of 25 batches ({8 * k} of 200 frames) already done" in resumed[0], lines
    assert result.stages["mtov"].cached is False
    assert any(
        f"({200 - 8 * k} of 200 frames generated, {8 * k} reused; autoencoders " in line for line in lines
    ), lines
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("mtov-*/batch-*")}
    assert {name: done[name] for name in finished} == finished  # not written again
    assert len(done) == 25 and not list(work.glob(".talk*")) and not list(work.glob("mtov-*.partial"))

    np.testing.assert_array_equal(_frames(work), _frames(whole.with_name("talk_work")))
    assert out.read_bytes() == whole.read_bytes()
    assert out.with_name("talk_preview.mp4").read_bytes() == whole.with_name("talk_preview.mp4").read_bytes()


# ----------------------------------------------------------------------------- memory
def _peak_rss_mb(audio: Path, ref: Path, out: Path) -> float:
    """Peak resident memory (MB) of a child process running the pipeline, as the kernel counts it."""
    code = (
        "import json, resource, sys; from pipeline.inference import main; main(sys.argv[1:]); "
        "print(json.dumps({'peak_rss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *_argv(audio, ref, out, "--batch_size", "4")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert probe(out)["video"]["frames"] == round(probe(audio)["audio"]["duration"] * 25)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_kb"] / 1024


def _compare_memory(inputs, tmp_path, long_s: float, short_s: float) -> None:
    peaks = {}
    for seconds in (short_s, long_s):
        audio = write_speech(tmp_path / f"speech{seconds:g}.wav", seconds=seconds)
        peaks[seconds] = _peak_rss_mb(audio, inputs["video"], tmp_path / f"out{seconds:g}.mp4")
    ratio = peaks[long_s] / peaks[short_s]
    text = ", ".join(f"{s:g} s of audio {mb:.0f} MB" for s, mb in peaks.items())
    print(f"peak RSS (tiny config, random weights): {text}; ratio {ratio:.2f}")
    assert ratio <= 1.25, peaks


def test_peak_memory_does_not_grow_with_length(inputs, tmp_path):
    """90 s of audio within 1.25x of the peak RSS of 15 s (before streaming: ~47 MB more per second)."""
    _compare_memory(inputs, tmp_path, 90.0, 15.0)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_length_3_minutes(inputs, tmp_path):
    _compare_memory(inputs, tmp_path, 180.0, 30.0)
