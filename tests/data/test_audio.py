"""data.audio: loading/resampling any input to 16 kHz mono, and HuBERT feature lengths/chunking.

A tiny ``HubertConfig`` model (real 400/320 front end, a few channels) is saved to a temp folder
and loaded through the same ``from_pretrained`` path as the real hubert-large-ls960-ft.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from data.audio import (
    CHUNK_SAMPLES,
    HubertExtractor,
    check_waveform,
    hubert_num_frames,
    load_audio,
    main,
    resample,
)
from moditalker.errors import UserError

HIDDEN = 32


@pytest.fixture(scope="module")
def tiny_hubert_dir(tmp_path_factory) -> Path:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    folder = tmp_path_factory.mktemp("tiny_hubert")
    config = HubertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    torch.manual_seed(0)
    HubertModel(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=16000).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def extractor(tiny_hubert_dir) -> HubertExtractor:
    return HubertExtractor(tiny_hubert_dir, device="cpu", batch_size=4)


def _speechy(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _write_av(path: Path, wave: np.ndarray, rate: int, codec: str, with_video: bool = False) -> None:
    """Encode mono ``wave`` with PyAV (optionally next to a short black video stream)."""
    with av.open(str(path), mode="w") as out:
        if with_video:
            vs = out.add_stream("mpeg4", rate=25)
            vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        a = out.add_stream(codec, rate=rate)
        a.layout = "mono"
        if with_video:
            n_frames = int(len(wave) / rate * 25)
            for _ in range(n_frames):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                for packet in vs.encode(frame):
                    out.mux(packet)
            for packet in vs.encode():
                out.mux(packet)
        block = 1024
        for start in range(0, len(wave), block):
            chunk = wave[start : start + block].astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for packet in a.encode(frame):
                out.mux(packet)
        for packet in a.encode():
            out.mux(packet)


def _dominant_hz(wave: np.ndarray, rate: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spec.argmax()])


# ------------------------------------------------------------------------------------------------
# loading


def test_stereo_44k_wav_is_mixed_and_resampled(tmp_path):
    rate, n = 44100, 44100 * 2
    t = np.arange(n) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.2 * np.sin(2 * np.pi * 1000 * t)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1).astype(np.float32), rate, subtype="FLOAT")
    wave = load_audio(tmp_path / "s.wav")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == 32000  # 2 s at 16 kHz (ceil(n * 160 / 441))
    # mono = channel mean, and the band-limited resampler keeps both tones where they were
    t16 = np.arange(len(wave)) / 16000
    expect = 0.25 * np.sin(2 * np.pi * 440 * t16) + 0.1 * np.sin(2 * np.pi * 1000 * t16)
    inner = slice(400, -400)  # filter edge effects at both ends
    np.testing.assert_allclose(wave[inner], expect[inner], atol=2e-3)


def test_resample_keeps_frequency():
    rate = 22050
    t = np.arange(rate) / rate
    out = resample(np.sin(2 * np.pi * 300 * t), rate, 16000)
    assert len(out) == 16000 and out.dtype == np.float32
    assert abs(_dominant_hz(out) - 300) <= 1.0
    np.testing.assert_array_equal(resample(out, 16000, 16000), out)


@pytest.mark.parametrize(
    ("suffix", "codec", "with_video"), [(".m4a", "aac", False), (".mp4", "aac", True), (".mp3", None, False)]
)
def test_compressed_audio_and_video_track(tmp_path, suffix, codec, with_video):
    rate = 48000 if suffix != ".mp3" else 44100
    t = np.arange(rate * 2) / rate
    wave = (0.4 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
    path = tmp_path / f"clip{suffix}"
    if codec is None:
        sf.write(path, wave, rate, format="MP3")
    else:
        _write_av(path, wave, rate, codec, with_video=with_video)
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 32000) <= 2048  # codec priming/padding adds at most a frame or two
    assert abs(_dominant_hz(out) - 500) <= 2.0
    assert 0.3 < np.abs(out).max() < 0.5


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"this is not audio" * 50)
    with pytest.raises(UserError, match="cannot read audio"):
        load_audio(bad)
    mute_video = tmp_path / "mute.mp4"
    with av.open(str(mute_video), mode="w") as out:
        vs = out.add_stream("mpeg4", rate=25)
        vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
        for _ in range(5):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    with pytest.raises(UserError, match="no audio track"):
        load_audio(mute_video)


def test_check_waveform_errors():
    with pytest.raises(UserError, match="too short"):
        check_waveform(_speechy(399))
    with pytest.raises(UserError, match="silent"):
        check_waveform(np.zeros(16000, np.float32))
    with pytest.raises(UserError, match="NaN"):
        check_waveform(np.full(16000, np.nan, np.float32))
    with pytest.raises(UserError, match="mono"):
        check_waveform(np.zeros((2, 16000), np.float32))
    assert check_waveform(_speechy(400)).shape == (400,)


# ------------------------------------------------------------------------------------------------
# HuBERT


@pytest.mark.parametrize(
    "n", [400, 16000, 16000 + 123, CHUNK_SAMPLES + 80, CHUNK_SAMPLES + 80 - 1, 25 * 16000]
)
def test_feature_lengths(extractor, n):
    feats = extractor(_speechy(n))
    assert feats.shape == ((n - 80) // 320, HIDDEN) == (hubert_num_frames(n), HIDDEN)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()


def test_chunks_are_the_original_20s_windows(extractor):
    """Long audio = model on [0, 320080) ++ model on [320000, N) of the globally normalised wave."""
    n = 25 * 16000
    wave = _speechy(n, seed=3)
    feats = extractor(wave)
    norm = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)  # Wav2Vec2FeatureExtractor do_normalize
    np.testing.assert_allclose(extractor.normalize(wave), norm, atol=1e-5)
    with torch.inference_mode():
        first = extractor.model(torch.from_numpy(norm[None, : CHUNK_SAMPLES + 80])).last_hidden_state[0]
        tail = extractor.model(torch.from_numpy(norm[None, CHUNK_SAMPLES:])).last_hidden_state[0]
    assert first.shape[0] == 1000 and tail.shape[0] == (n - CHUNK_SAMPLES - 80) // 320
    np.testing.assert_allclose(feats[:1000], first.numpy(), atol=1e-5)
    np.testing.assert_allclose(feats[1000:], tail.numpy(), atol=1e-5)


def test_batched_chunks_equal_one_by_one(tiny_hubert_dir):
    wave = _speechy(3 * CHUNK_SAMPLES + 5000, seed=5)  # three full chunks + a tail
    batched = HubertExtractor(tiny_hubert_dir, batch_size=3)(wave)
    single = HubertExtractor(tiny_hubert_dir, batch_size=1)(wave)
    assert batched.shape == (hubert_num_frames(len(wave)), HIDDEN)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_errors_reach_the_extractor(extractor):
    with pytest.raises(UserError, match="silent"):
        extractor(np.zeros(32000, np.float32))
    with pytest.raises(UserError, match="too short"):
        extractor(_speechy(300))


def test_missing_model_points_to_assets(tmp_path):
    with pytest.raises(UserError, match="moditalker.assets check"):
        HubertExtractor(tmp_path / "no_such_folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        HubertExtractor(tmp_path / "empty")
    with pytest.raises(UserError, match="moditalker.assets check"):
        HubertExtractor("no-such-org-xyz/no-such-hubert-xyz", local_files_only=True)


def test_random_extractor_shapes():
    ex = HubertExtractor.random(hidden_size=64, seed=1, conv_dim=8)
    feats = ex(_speechy(16000))
    assert feats.shape == (49, 64)
    again = HubertExtractor.random(hidden_size=64, seed=1, conv_dim=8)(_speechy(16000))
    np.testing.assert_array_equal(feats, again)  # seeded
    # on the CPU with the math attention (the benchmark's faithful arithmetic), bit for bit
    with sdpa_kernel(SDPBackend.MATH):
        faithful = HubertExtractor.random(hidden_size=64, seed=1, conv_dim=8)(_speechy(16000))
    np.testing.assert_array_equal(feats, faithful)


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_random_weights_warns_loudly(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", _speechy(16000), 16000)
    argv = ["--audio", str(tmp_path / "a.wav"), "--out_dir", str(tmp_path / "h"), "--device", "cpu"]
    assert main(argv + ["--random_weights", "--hidden_size", "16"]) == [tmp_path / "h" / "a.npy"]
    assert np.load(tmp_path / "h" / "a.npy").shape == ((16000 - 80) // 320, 16)
    assert "WARNING: --random_weights: HuBERT is RANDOMLY INITIALISED" in capsys.readouterr().err


def test_cli_bad_audio_is_refused_before_the_network_and_its_warning(tmp_path, capsys):
    from moditalker.errors import cli_main

    (tmp_path / "notes.wav").write_text("not audio")
    argv = ["--audio", str(tmp_path / "notes.wav"), "--out_dir", str(tmp_path / "h"), "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv + ["--random_weights", "--hidden_size", "16"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and "notes.wav" in err[0], err
    assert not (tmp_path / "h").exists()


def test_cli_writes_features_wav_and_config(tmp_path, tiny_hubert_dir, capsys):
    rate = 44100
    t = np.arange(int(rate * 1.5)) / rate
    stereo = np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 300 * t)], 1) * 0.3
    sf.write(tmp_path / "talk.wav", stereo.astype(np.float32), rate)
    out_dir, wav_dir = tmp_path / "hubert", tmp_path / "wav16k"
    argv = ["--audio", str(tmp_path / "talk.wav"), "--out_dir", str(out_dir), "--wav_dir", str(wav_dir)]
    argv += ["--model", str(tiny_hubert_dir), "--device", "cpu"]
    written = main(argv)
    assert written == [out_dir / "talk.npy"]
    feats = np.load(out_dir / "talk.npy")
    assert feats.shape == ((24000 - 80) // 320, HIDDEN) and feats.dtype == np.float32
    wav, sr = sf.read(wav_dir / "talk.wav")
    assert sr == 16000 and wav.ndim == 1 and len(wav) == 24000
    assert (out_dir / "hubert_config.yaml").is_file()
    # outputs are never overwritten silently
    with pytest.raises(UserError, match="overwrite"):
        main(argv)
    assert main(argv + ["--skip_existing"]) == []
    assert main(argv + ["--overwrite"]) == [out_dir / "talk.npy"]
    # --out X.npy writes its settings to X.yaml: an existing X.yaml (a file of the user's) is an output
    # like X.npy, refused before anything is written
    single = ["--audio", str(tmp_path / "talk.wav"), "--model", str(tiny_hubert_dir), "--device", "cpu"]
    (tmp_path / "mine.yaml").write_text("precious: 1\n")
    with pytest.raises(UserError, match="mine.yaml already exists"):
        main(single + ["--out", str(tmp_path / "mine.npy")])
    assert (tmp_path / "mine.yaml").read_text() == "precious: 1\n" and not (tmp_path / "mine.npy").exists()
    assert main(single + ["--out", str(tmp_path / "other.npy")]) == [tmp_path / "other.npy"]
    assert "model_used" in (tmp_path / "other.yaml").read_text()


def test_cli_too_short_exits_2(tmp_path, tiny_hubert_dir, capsys):
    from moditalker.errors import cli_main

    sf.write(tmp_path / "short.wav", _speechy(4000), 16000)  # 0.25 s < --min_duration 0.5
    argv = [
        "--audio",
        str(tmp_path / "short.wav"),
        "--out_dir",
        str(tmp_path),
        "--model",
        str(tiny_hubert_dir),
    ]
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    assert exc.value.code == 2
    assert "too short" in capsys.readouterr().err
    assert not (tmp_path / "short.npy").exists()
    assert main(argv + ["--min_duration", "0.1"]) == [tmp_path / "short.npy"]


@pytest.mark.slow
def test_process_audio_script_random_weights(tmp_path):
    """scripts/process_audio.sh end to end in a fresh process (random HuBERT, default 1024-d)."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "scripts" / "process_audio.sh"
    sf.write(tmp_path / "a.flac", _speechy(20000), 16000)
    cmd = ["bash", str(script), "--audio", str(tmp_path / "a.flac"), "--out_dir", str(tmp_path / "h")]
    run = subprocess.run(
        cmd + ["--random_weights", "--device", "cpu"], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.load(tmp_path / "h" / "a.npy").shape == ((20000 - 80) // 320, 1024)
    assert "WARNING: --random_weights: HuBERT is RANDOMLY" in run.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--hidden_size", "0"], "hidden_size must be a positive multiple"),
        (["--hidden_size", "-4"], "hidden_size must be a positive multiple"),
        (["--min_duration", "nan"], "--min_duration must be a number of seconds >= 0"),
        (["--out", "OUT/feats.txt"], "--out must end in .npy"),
        (["--audio", "BAD_IN_FOLDER"], "cannot read audio"),
    ],
)
def test_cli_bad_arguments_exit_2_nothing_written(tmp_path, capsys, extra, message):
    """--hidden_size 0 / -4 and --min_duration nan were tracebacks; --out x.txt wrote .npy data to
    a .txt; a folder with one unreadable file among good ones wrote the good files' features and
    then stopped (exit 2, partial output, no config). Now every input is checked first."""
    from moditalker.errors import cli_main

    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "a_good.wav", _speechy(16000), 16000)
    (folder / "b_bad.wav").write_text("not audio")
    out_dir = tmp_path / "out"
    if "BAD_IN_FOLDER" in extra:
        argv = ["--audio", str(folder)]
    else:
        argv = ["--audio", str(folder / "a_good.wav")]
        argv += [str(out_dir / "feats.txt") if e == "OUT/feats.txt" else e for e in extra]
    argv += ["--out_dir", str(out_dir), "--random_weights", "--device", "cpu"]
    if "--hidden_size" not in extra:
        argv += ["--hidden_size", "16"]
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in lines if line.startswith("error")] if exc.value.code == 2 else lines
    assert exc.value.code == 2 and len(lines) == 1, lines
    assert message in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())
