"""scripts/download_hdtf.sh (data.hdtf_download): HDTF metadata -> exact 25 fps clips with audio, through a
local HTTP server standing in for the video host (yt-dlp's generic extractor downloads direct file URLs)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from http_stub import StubServer

from data import hdtf_download
from data.video import probe, read_video, write_video
from moditalker.errors import UserError

N_FRAMES = 100  # 4 s at 25 fps
SR = 16000


def encode_index(i: int) -> np.ndarray:
    """A 64x128 frame: the left half mid-grey, the right half frame index ``i`` in 8 black/white bars."""
    frame = np.full((64, 128, 3), 128, np.uint8)
    for bit in range(8):
        frame[:, 64 + 8 * bit : 64 + 8 * bit + 8] = 255 if (i >> bit) & 1 else 0
    return frame


def decode_index(frame: np.ndarray) -> int:
    """The index of :func:`encode_index` from a frame cropped to its right half (64x64)."""
    return sum(1 << b for b in range(8) if frame[16:48, 8 * b + 2 : 8 * b + 6].mean() > 128)


@pytest.fixture(scope="module")
def source_mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "talk.mp4"
    t = np.arange(N_FRAMES * SR // 25) / SR
    write_video(
        path, np.stack([encode_index(i) for i in range(N_FRAMES)]), 25, 0.3 * np.sin(2 * np.pi * 220 * t), SR
    )
    return path.read_bytes()


@pytest.fixture
def host(source_mp4, tmp_path):
    meta = tmp_path / "HDTF_dataset"
    meta.mkdir()
    with StubServer() as server:
        server.files["/videos/talk.mp4"] = source_mp4
        (meta / "RD_video_url.txt").write_text(
            f"Talk {server.url}/videos/talk.mp4\nGone {server.url}/videos/removed.mp4\n"
        )
        (meta / "RD_annotion_time.txt").write_text(
            "Talk.mp4 00:01-00:02 00:02-00:03\nGone.mp4 00:00-00:02\nNoUrl.mp4 00:00-00:01\n"
        )
        # the face window of each interval (x w y h) at the resolution of RD_resolution.txt (64 rows)
        (meta / "RD_crop_wh.txt").write_text("Talk_0.mp4 64 64 0 64\nTalk_1.mp4 64 64 0 64\n")
        (meta / "RD_resolution.txt").write_text("Talk.mp4 64\nGone.mp4 720\n")
        yield server, meta


def _run(meta, out, *extra):
    argv = ["--metadata", str(meta), "--out", str(out), "--subsets", "RD", "--size", "64", "--no_progress"]
    return hdtf_download.main([*argv, *extra])


def test_metadata_to_exact_clips_and_a_dead_video_reported(host, tmp_path, capsys):
    server, meta = host
    out = tmp_path / "clips"
    with pytest.raises(UserError, match=r"1 video\(s\) could not be downloaded or cut \(RD_Gone\)"):
        _run(meta, out)
    printed = capsys.readouterr().out
    assert "clips made: 2" in printed and "unavailable: RD_Gone" in printed and "404" in printed
    assert "RD_NoUrl: annotated but has no URL" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "RD_Talk_000.mp4",
        "RD_Talk_001.mp4",
        "download_report.json",
        "download_settings.json",
    ]
    report = json.loads((out / "download_report.json").read_text())
    assert report["clips_made"] == ["RD_Talk_000", "RD_Talk_001"] and list(report["failed"]) == ["RD_Gone"]
    for k, first in ((0, 25), (1, 50)):
        frames, fps = read_video(out / f"RD_Talk_{k:03d}.mp4", fps=None)
        assert fps == 25 and frames.shape == (25, 64, 64, 3)  # 1 s, the crop_wh window (right half)
        assert [decode_index(f) for f in frames] == list(range(first, first + 25))  # exact to the frame
        info = probe(out / f"RD_Talk_{k:03d}.mp4")
        assert info["audio"] is not None and abs(info["audio"]["duration"] - 1.0) < 0.05

    # a re-run does nothing new: no request to the host for the finished video, no clip rewritten
    n = len([r for r in server.requests if r[0] == "/videos/talk.mp4"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    with pytest.raises(UserError, match="RD_Gone"):
        _run(meta, out)
    assert "clips made: 0; already there: 2" in capsys.readouterr().out
    assert len([r for r in server.requests if r[0] == "/videos/talk.mp4"]) == n
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == mtimes


def test_an_interrupted_cut_leaves_no_clip_and_resumes(host, tmp_path, monkeypatch, capsys):
    server, meta = host
    (meta / "RD_video_url.txt").write_text(f"Talk {server.url}/videos/talk.mp4\n")
    (meta / "RD_annotion_time.txt").write_text("Talk.mp4 00:01-00:02 00:02-00:03\n")
    out = tmp_path / "clips"
    from data import video

    real_write = video.VideoWriter.write

    def power_cut(self, frames):
        if self.path.name == "RD_Talk_001.mp4" and self.frames_written == 10:
            raise RuntimeError("power cut")
        real_write(self, frames)

    monkeypatch.setattr(video.VideoWriter, "write", power_cut)
    with pytest.raises(UserError, match="RD_Talk"):
        _run(meta, out)
    assert "power cut" in capsys.readouterr().out
    assert (out / "RD_Talk_000.mp4").is_file() and not (out / "RD_Talk_001.mp4").exists()
    assert not list(out.glob(".RD_Talk_001.mp4*"))  # the half-written clip was removed
    assert list((out / ".raw").iterdir())  # the raw download is kept for the next run
    (out / ".RD_Talk_001.mp4.stale.mp4").write_bytes(b"left by a killed run")
    n = len(server.requests)

    monkeypatch.setattr(video.VideoWriter, "write", real_write)
    report = _run(meta, out, "--jobs", "2")
    assert report["clips_made"] == ["RD_Talk_001"] and report["clips_present"] == ["RD_Talk_000"]
    assert len(server.requests) == n  # cut from the kept raw download, not fetched again
    frames, _ = read_video(out / "RD_Talk_001.mp4", fps=None)
    assert [decode_index(f) for f in frames] == list(range(50, 75))
    assert sorted(p.name for p in out.iterdir()) == [
        "RD_Talk_000.mp4",
        "RD_Talk_001.mp4",
        "download_report.json",
        "download_settings.json",
    ]


def test_keep_raw_and_bad_metadata(host, tmp_path):
    server, meta = host
    (meta / "RD_video_url.txt").write_text(f"Talk {server.url}/videos/talk.mp4\n")
    (meta / "RD_annotion_time.txt").write_text("Talk.mp4 00:03-00:04\n")
    out = tmp_path / "clips"
    report = _run(meta, out, "--keep_raw", "--crop", "none", "--size", "0")
    assert report["clips_made"] == ["RD_Talk_000"]
    assert [p.name for p in (out / ".raw").iterdir()] == ["RD_Talk.video.mp4"]
    frames, _ = read_video(out / "RD_Talk_000.mp4", fps=None)
    assert frames.shape == (25, 64, 128, 3)  # --crop none --size 0: the whole frame
    with pytest.raises(UserError, match="holds clips made with"):  # one size and crop per folder
        _run(meta, out, "--keep_raw", "--size", "0")
    (meta / "RD_annotion_time.txt").write_text("Talk.mp4 00:05-00:03\n")
    with pytest.raises(UserError, match="ends before it starts"):
        _run(meta, out)
    (meta / "RD_annotion_time.txt").write_text("Talk.mp4 00:03-00:09\n")  # longer than the video
    with pytest.raises(UserError, match="RD_Talk"):
        _run(meta, tmp_path / "other")
    with pytest.raises(UserError, match="not found"):
        _run(meta, out, "--subsets", "XX")
    with pytest.raises(UserError, match="even number"):
        _run(meta, out, "--size", "511")


def test_an_interrupted_video_download_resumes(host, tmp_path):
    """The host drops the connection halfway: yt-dlp keeps the bytes and asks for the rest (Range)."""
    server, meta = host
    (meta / "RD_video_url.txt").write_text(f"Talk {server.url}/videos/talk.mp4\n")
    (meta / "RD_annotion_time.txt").write_text("Talk.mp4 00:00-00:01\n")
    server.cut_nth["/videos/talk.mp4"] = 2  # the download itself (the first GET is yt-dlp's probe)
    report = _run(meta, tmp_path / "clips")
    assert report["clips_made"] == ["RD_Talk_000"] and not report["failed"]
    assert any(path == "/videos/talk.mp4" and rng and rng != "bytes=0-" for path, rng in server.requests)
    frames, _ = read_video(tmp_path / "clips" / "RD_Talk_000.mp4", fps=None)
    assert [decode_index(f) for f in frames] == list(range(25))


def test_a_download_fragment_is_never_taken_as_the_download(host, tmp_path):
    """yt-dlp's leftovers of a killed run (``KEY.video.mp4.part-Frag3``, ``.ytdl``) are not a finished
    download: the video is fetched and cut as usual."""
    server, meta = host
    (meta / "RD_video_url.txt").write_text(f"Talk {server.url}/videos/talk.mp4\n")
    (meta / "RD_annotion_time.txt").write_text("Talk.mp4 00:01-00:02\n")
    raw = tmp_path / "clips" / ".raw"
    raw.mkdir(parents=True)
    for name in ("RD_Talk.video.mp4.part-Frag3", "RD_Talk.video.mp4.ytdl", "RD_Talk.video.temp.mp4"):
        (raw / name).write_bytes(b"a fragment, not a video")
    assert hdtf_download.finished_download(raw / "RD_Talk.video") is None
    report = _run(meta, tmp_path / "clips")
    assert report["clips_made"] == ["RD_Talk_000"] and not report["failed"]
    frames, _ = read_video(tmp_path / "clips" / "RD_Talk_000.mp4", fps=None)
    assert [decode_index(f) for f in frames] == list(range(25, 50))


def test_a_download_that_cannot_be_read_is_deleted_and_fetched_again(host, source_mp4, tmp_path, capsys):
    server, meta = host
    (meta / "RD_video_url.txt").write_text(f"Talk {server.url}/videos/talk.mp4\n")
    (meta / "RD_annotion_time.txt").write_text("Talk.mp4 00:01-00:02\n")
    server.files["/videos/talk.mp4"] = b"\0" * 4096 + source_mp4[4096:]  # damaged: no file header
    out = tmp_path / "clips"
    with pytest.raises(UserError, match="RD_Talk"):
        _run(meta, out)
    assert "the download is removed, the next run fetches it again" in capsys.readouterr().out
    assert not list((out / ".raw").glob("RD_Talk*")) and not (out / "RD_Talk_000.mp4").exists()
    server.files["/videos/talk.mp4"] = source_mp4  # the host serves it whole again
    report = _run(meta, out)
    assert report["clips_made"] == ["RD_Talk_000"] and not report["failed"]


def test_the_space_is_checked_before_anything_is_downloaded(host, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    from data import hdtf_folder

    server, meta = host
    (meta / "RD_video_url.txt").write_text(f"Talk {server.url}/videos/talk.mp4\n")
    (meta / "RD_annotion_time.txt").write_text("Talk.mp4 00:01-00:02 00:02-00:03\n")
    videos, _ = hdtf_download.read_metadata(meta, ["RD"])
    out = tmp_path / "clips"
    out.mkdir()
    need, n = hdtf_folder.space_needed(videos, out, 64, jobs=4, keep_raw=False)  # _run's --size 64
    # 2 s of 64x64 clips and a 3 s raw download at the metadata's 64 rows, with the margin
    rate = hdtf_folder.RAW_RATES[0][1] + hdtf_folder.AUDIO_RATE
    assert n == 2 and need == int(1.2 * (2 * hdtf_folder.CLIP_RATE_512 / 64 + 3 * rate))
    assert hdtf_folder.space_needed(videos, out, 512, 4, False)[0] > need  # bigger clips, more space
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, need - 1))
    with pytest.raises(UserError, match=r"not enough free space in .*clips: about \d+ MB needed \(2 clip"):
        _run(meta, out)
    assert server.requests == [] and not (out / ".raw").exists()  # nothing was fetched
    report = _run(meta, out, "--no_space_check")
    assert report["clips_made"] == ["RD_Talk_000", "RD_Talk_001"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**11))
    _run(meta, tmp_path / "other")
    printed = capsys.readouterr().out
    assert re.search(
        r"disk: about \d+ MB needed in \S*other \(2 clip\(s\) to make, .*\), 95367 MB free", printed
    )
    assert hdtf_folder.space_needed(videos, out, 64, 4, False) == (0, 0)  # all made: nothing needed
