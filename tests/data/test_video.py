"""data.video: decode/resample by timestamps, H.264 + AAC writing (atomic), probe, images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.video import probe, read_image, read_video, write_video
from moditalker.errors import UserError


def _ramp_video(n: int, h: int = 64, w: int = 96) -> np.ndarray:
    """Frames that encode their index in binary as 7 black/white bands (robust to H.264 loss)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    edges = np.linspace(0, w, 8).astype(int)
    for k in range(n):
        for b in range(7):
            if (k >> b) & 1:
                frames[k, :, edges[b] : edges[b + 1]] = 255
    return frames


def _index(frames: np.ndarray) -> np.ndarray:
    w = frames.shape[2]
    edges = np.linspace(0, w, 8).astype(int)
    idx = np.zeros(len(frames), int)
    for b in range(7):
        band = frames[:, :, edges[b] + 2 : edges[b + 1] - 2].astype(np.float64).mean(axis=(1, 2, 3))
        idx += (band > 128).astype(int) << b
    return idx


def _tone(seconds: float, sr: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def test_roundtrip_25fps_with_audio_and_metadata(tmp_path):
    frames = _ramp_video(50)
    out = write_video(tmp_path / "a.mp4", frames, fps=25, audio=_tone(2.0), metadata={"comment": "hi"})
    info = probe(out)
    assert info["video"]["codec"] == "h264"
    assert info["video"]["fps"] == 25.0
    assert (info["video"]["width"], info["video"]["height"]) == (96, 64)
    assert info["video"]["frames"] == 50
    assert info["audio"]["codec"] == "aac"
    assert info["audio"]["sample_rate"] == 16000 and info["audio"]["channels"] == 1
    assert abs(info["audio"]["duration"] - 2.0) < 0.04
    assert info["metadata"]["comment"] == "hi"
    decoded, fps = read_video(out)
    assert fps == 25.0 and decoded.shape == (50, 64, 96, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(_index(decoded), np.arange(50))
    assert np.abs(decoded.astype(int) - frames).mean() < 4.0
    # no temp files left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_resample_30_to_25_by_timestamps(tmp_path):
    write_video(tmp_path / "v30.mp4", _ramp_video(60), fps=30)
    frames, fps = read_video(tmp_path / "v30.mp4", fps=25)
    assert fps == 25.0 and len(frames) == 50  # 2 s kept
    # output slot k shows the latest input frame i with round(i * 25 / 30) == k
    expected = [max(i for i in range(60) if np.floor(i * 25 / 30 + 0.5) <= k) for k in range(50)]
    np.testing.assert_array_equal(_index(frames), expected)
    native, native_fps = read_video(tmp_path / "v30.mp4", fps=None)
    assert native_fps == 30.0 and len(native) == 60
    up, _ = read_video(tmp_path / "v30.mp4", fps=50)
    assert len(up) == 100
    np.testing.assert_array_equal(_index(up)[:6], [0, 0, 1, 2, 2, 3])
    first, _ = read_video(tmp_path / "v30.mp4", fps=25, max_frames=7)
    np.testing.assert_array_equal(_index(first), expected[:7])


def test_odd_size_and_stereo_int16(tmp_path):
    stereo = (np.stack([_tone(0.4), -_tone(0.4)], axis=1) * 32767).astype(np.int16)  # [N, 2]
    write_video(tmp_path / "odd.mp4", _ramp_video(10, 33, 45), fps=25, audio=stereo, sample_rate=16000)
    info = probe(tmp_path / "odd.mp4")
    assert (info["video"]["width"], info["video"]["height"]) == (46, 34)
    assert info["audio"]["channels"] == 2


def test_write_is_atomic_on_error(tmp_path):
    target = tmp_path / "bad.mp4"
    with pytest.raises(ValueError):
        write_video(target, np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(ValueError):
        write_video(target, _ramp_video(3), audio=np.zeros((3, 5, 7), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 10)
    with pytest.raises(UserError, match="junk.mp4"):
        read_video(junk)
    with pytest.raises(UserError, match="junk.mp4"):
        probe(junk)
    with pytest.raises(UserError, match="junk.mp4"):
        read_image(junk)


def test_audio_only_file_has_no_video_stream(tmp_path):
    import av

    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(_tone(0.5)[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    info = probe(path)
    assert info["video"] is None and info["audio"]["sample_rate"] == 16000
    with pytest.raises(UserError, match="no video stream"):
        read_video(path)


def test_read_image_png_and_exif(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), rgb)
    gray = Image.fromarray(rgb[..., 0])
    assert read_image_via(gray, tmp_path / "g.png").shape == (20, 30, 3)
    # EXIF orientation 6 (rotate 90 degrees clockwise on display) is applied
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    assert read_image(tmp_path / "r.jpg").shape == (30, 20, 3)


def read_image_via(image: Image.Image, path) -> np.ndarray:
    image.save(path)
    return read_image(path)


def test_display_rotation_is_applied(tmp_path):
    """Phone videos store a display rotation; frames come back upright (as ffmpeg autorotates)."""
    import av

    image = np.zeros((32, 64, 3), np.uint8)
    image[:8, :8] = 255  # a white block in the top-left corner
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)  # counter-clockwise
        for k in range(3):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    upright, _ = read_video(path)
    assert upright.shape == (3, 64, 32, 3)
    rows, cols = np.argwhere(upright[0, ..., 0] > 128).mean(axis=0)
    assert rows > 48 and cols < 16  # turned counter-clockwise: top-left -> bottom-left
    raw, _ = read_video(path, autorotate=False)
    assert raw.shape == (3, 32, 64, 3)


def test_bad_fps_folder_and_junk_are_user_errors(tmp_path):
    """fps 0 wrote a video of one held frame (exit 0), fps -1 / nan were av/ValueError tracebacks;
    a folder was reported as 'not found', a text file renamed .wav as 'not a valid video file'."""
    write_video(tmp_path / "v.mp4", _ramp_video(3))
    for fps in (0, -25, float("nan")):
        with pytest.raises(UserError, match="fps must be a positive number"):
            read_video(tmp_path / "v.mp4", fps=fps)
        with pytest.raises(UserError, match="fps must be a positive number"):
            write_video(tmp_path / "w.mp4", _ramp_video(3), fps=fps)
    assert not (tmp_path / "w.mp4").exists()
    with pytest.raises(UserError, match="is a folder"):
        read_video(tmp_path)
    (tmp_path / "notes.wav").write_text("hello")
    with pytest.raises(UserError, match="not an audio or video file that FFmpeg can decode") as info:
        probe(tmp_path / "notes.wav")
    assert "Errno" not in str(info.value)  # FFmpeg's raw '[Errno 1094995529] Invalid data found'
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(UserError, match="empty.mp4: the file is empty"):
        read_video(tmp_path / "empty.mp4")
    with pytest.raises(UserError, match="image file .* is a folder, not a file"):
        read_image(tmp_path)


def test_huge_image_is_a_user_error(tmp_path):
    """A PNG over PIL's decompression-bomb limit (a tiny file) was a DecompressionBombError traceback."""
    Image.new("L", (14000, 14000)).save(tmp_path / "huge.png")
    with pytest.raises(UserError, match="too large"):
        read_image(tmp_path / "huge.png")
