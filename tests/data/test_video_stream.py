"""data.video streaming: iter_video yields read_video's frames as they decode; VideoWriter writes the
file write_video writes, batch by batch, and leaves nothing at the path until it is closed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data.video import VideoWriter, iter_video, probe, read_video, write_video
from moditalker.errors import UserError


def _frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.repeat(rng.integers(0, 256, (n, h // 8, w // 8, 3), dtype=np.uint8), 8, axis=1)
    return np.repeat(frames, 8, axis=2)


def _tone(samples: int, sr: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / sr)).astype(np.float32)


@pytest.mark.parametrize("fps", [25, None, 10])
def test_iter_video_yields_read_video_frames(tmp_path, fps):
    video = write_video(tmp_path / "v.mp4", _frames(30), fps=30)
    whole, rate = read_video(video, fps=fps)
    info: dict = {}
    streamed = list(iter_video(video, fps=fps, info=info))
    assert info["fps"] == rate and len(streamed) == len(whole)
    np.testing.assert_array_equal(np.stack(streamed), whole)
    first = list(itertools.islice(iter_video(video, fps=fps), 4))  # stop early: the rest is not decoded
    np.testing.assert_array_equal(np.stack(first), whole[:4])
    capped, _ = read_video(video, fps=fps, max_frames=7)
    np.testing.assert_array_equal(np.stack(list(iter_video(video, fps=fps, max_frames=7))), capped)


def test_iter_video_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        next(iter_video(tmp_path / "missing.mp4"))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(UserError, match="junk.mp4"):
        next(iter_video(junk))


@pytest.mark.parametrize("chunks", [[37], [1, 15, 21], [16, 16, 5]])
def test_writer_batch_by_batch_is_write_video(tmp_path, chunks):
    """With n_frames given, the file is byte for byte the one write_video writes, however the frames
    are split; the audio (a length that is not a whole number of frames) is muxed in full."""
    frames, audio = _frames(37), _tone(37 * 640 + 123)
    meta = {"comment": "streamed"}
    whole = write_video(tmp_path / "whole.mp4", frames, audio=audio, metadata=meta, preset="ultrafast")
    with VideoWriter(
        tmp_path / "parts.mp4", 64, 48, audio=audio, n_frames=37, metadata=meta, preset="ultrafast"
    ) as writer:
        for start, size in zip(np.cumsum([0, *chunks[:-1]]), chunks):
            writer.write(frames[start : start + size])
            assert not (tmp_path / "parts.mp4").exists()  # nothing at the path until closed
    assert (tmp_path / "parts.mp4").read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts.mp4", "whole.mp4"]


def test_writer_without_n_frames_and_temp_elsewhere(tmp_path):
    """Without n_frames the rest of the audio follows at close: same frames, same audio length; the
    temp file lives in tmp_dir (e.g. a work folder) and is moved to the path."""
    work, out = tmp_path / "work", tmp_path / "out" / "v.mp4"
    frames, audio = _frames(20), _tone(20 * 640 + 300)
    writer = VideoWriter(out, 64, 48, audio=audio, tmp_dir=work, preset="ultrafast")
    writer.write(frames[:9])
    assert [p.name.startswith(".v.mp4.") for p in work.iterdir()] == [True] and not out.exists()
    writer.write(frames[9:])
    writer.close()
    assert list(work.iterdir()) == [] and out.is_file()
    ref = write_video(tmp_path / "ref.mp4", frames, audio=audio, preset="ultrafast")
    np.testing.assert_array_equal(read_video(out)[0], read_video(ref)[0])
    a, b = probe(out), probe(ref)
    assert a["video"]["frames"] == 20 and a["audio"]["duration"] == b["audio"]["duration"]


def test_writer_abort_and_errors_leave_nothing(tmp_path):
    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="stop"):
        with VideoWriter(out, 64, 48, audio=_tone(3000)) as writer:
            writer.write(_frames(3))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    writer = VideoWriter(out, 64, 48)
    with pytest.raises(ValueError, match="frames must be"):
        writer.write(_frames(2, h=32))
    writer.abort()
    writer.abort()  # a no-op once aborted
    with pytest.raises(ValueError, match="closed"):
        writer.write(_frames(1))
    with pytest.raises(ValueError, match="no frames"):
        VideoWriter(out, 64, 48).close()
    assert list(tmp_path.iterdir()) == []


def test_writer_temp_on_another_file_system_is_copied(tmp_path):
    import os
    import tempfile

    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to put the temp file on")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        out = tmp_path / "v.mp4"
        with VideoWriter(out, 64, 48, tmp_dir=other, preset="ultrafast") as writer:
            writer.write(_frames(5))
        assert os.listdir(other) == [] and probe(out)["video"]["frames"] == 5
        assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
