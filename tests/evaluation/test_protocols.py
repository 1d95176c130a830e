"""evaluation.protocols: self-reconstruction and cross-identity through the tiny random pipeline,
resume, the real clips' alignment with the pipeline's reference frames, and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.audio import load_audio
from data.imageops import resize_crop
from data.sample_data import reference_frames, write_speech
from data.video import read_video, write_video
from evaluation import protocols
from evaluation.evaluate import build_parser, main
from moditalker.errors import UserError, cli_main
from moditalker.fileio import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "inference_tiny.yaml")
SECONDS = 0.6  # 15 frames of each 1 s video: two 8-frame MToV clips per run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two 1 s ids with speech: ``id_a`` square, ``id_b`` 256x320 (the protocol crops the centre);
    a split file, and a pipeline cache folder the tests share (cross_identity reuses the
    reference, landmark, recon and HuBERT entries of the self-reconstruction runs)."""
    root = tmp_path_factory.mktemp("protocols")
    speech = load_audio(write_speech(root / "speech.wav", 2.0))
    frames = reference_frames(25)
    wide = np.pad(frames[::-1], ((0, 0), (0, 0), (32, 32), (0, 0)), mode="edge")
    (root / "data").mkdir()
    write_video(root / "data" / "id_a.mp4", frames, audio=speech[:16000])
    write_video(root / "data" / "id_b.mp4", wide, audio=speech[16000:])
    (root / "split.txt").write_text("# the test ids\nid_a\n\nid_b  # second\n")
    return {"root": root, "data": root / "data", "split": root / "split.txt", "work": root / "work"}


@pytest.fixture
def count_runs(monkeypatch):
    """The number of pipeline runs (run_inference calls) of the protocol."""
    calls = []
    real = protocols.run_inference

    def counting(cfg, **kw):
        calls.append(str(cfg.out))
        return real(cfg, **kw)

    monkeypatch.setattr(protocols, "run_inference", counting)
    return calls


def _argv(dataset, protocol: str, out, *extra: str) -> list[str]:
    return [
        "--protocol",
        protocol,
        "--data",
        str(dataset["data"]),
        "--out",
        str(out),
        "--config",
        TINY,
        "--random_weights",
        "--device",
        "cpu",
        "--seconds",
        str(SECONDS),
        "--work_dir",
        str(dataset["work"]),
        "--no_progress",
        *extra,
    ]


def _cli_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what earlier runs printed
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


# ----------------------------------------------------------------------------- end to end
def test_selfrecon_end_to_end_then_resume(dataset, count_runs, capsys):
    out = dataset["root"] / "selfrecon"
    split = ["--split_file", str(dataset["split"])]
    report = main(
        _argv(dataset, "hdtf_selfrecon", out, *split, "--max_videos", "1", "--metrics", "psnr,ssim")
    )
    assert len(count_runs) == 1
    data = json.loads((out / "report.json").read_text())
    assert set(data) == {"metrics", "per_video", "settings", "reference"}
    assert set(data["metrics"]) == {"psnr", "ssim"} and set(data["per_video"]) == {"id_a"}
    assert data["per_video"]["id_a"]["frames"] == 15 and 0 < data["metrics"]["psnr"] < 100
    gen = data["settings"]["generation"]
    assert gen["protocol"] == "hdtf_selfrecon" and gen["generated"] == ["id_a"] and gen["reused"] == []
    assert gen["jobs"] == {"id_a": {"audio_id": "id_a", "ref_id": "id_a"}}
    assert data["metrics"] == pytest.approx(report["metrics"])
    assert "psnr" in (out / "report.txt").read_text()
    # the clip: 15 frames of audio, the real clip = the pipeline's reference frames (centre crop, 256)
    assert len(load_audio(out / "audio" / "id_a.wav")) == 15 * 640
    real, _ = read_video(out / "real" / "id_a.mp4")
    source, _ = read_video(dataset["data"] / "id_a.mp4")
    assert real.shape == (15, 256, 256, 3) and _psnr(real, resize_crop(source[:15], 256)) > 35
    assert read_video(out / "generated" / "id_a.mp4")[0].shape == (15, 256, 256, 3)
    assert (out / "logs" / "id_a.log").read_text().count("computed") >= 5
    assert (dataset["work"]).is_dir() and not (out / "work").exists()

    # resume: id_a is reused, only id_b is generated; the first report is left alone
    first = (out / "report.json").read_bytes()
    argv = _argv(dataset, "hdtf_selfrecon", out, *split, "--metrics", "psnr", "--json", str(out / "all.json"))
    report = main(argv)
    assert len(count_runs) == 2 and count_runs[-1].endswith("id_b.mp4")
    gen = report["settings"]["generation"]
    assert gen["generated"] == ["id_b"] and gen["reused"] == ["id_a"]
    assert set(report["per_video"]) == {"id_a", "id_b"}
    assert (out / "report.json").read_bytes() == first
    assert json.loads((out / "protocol.json").read_text())["done"] == ["id_a", "id_b"]
    real_b, _ = read_video(out / "real" / "id_b.mp4")
    wide, _ = read_video(dataset["data"] / "id_b.mp4")
    assert wide.shape[1:] == (256, 320, 3) and _psnr(real_b, wide[:15, :, 32:288]) > 35

    # the same report again, or other settings on the same folder: refused, nothing generated
    assert "--json OTHER.json" in _cli_error(argv, capsys)
    msg = _cli_error([*argv[:-2], "--json", str(out / "x.json"), "--set", "seed=3"], capsys)
    assert "other settings" in msg and "pipeline.seed" in msg
    assert len(count_runs) == 2


def test_cross_identity_reports_the_no_reference_metrics(dataset, count_runs):
    out = dataset["root"] / "cross"
    pairs = dataset["root"] / "pairs.txt"
    pairs.write_text("id_a id_b  # audio of a, face of b\n")
    report = main(_argv(dataset, "cross_identity", out, "--pairs", str(pairs), "--metrics", "lse,csim"))
    assert len(count_runs) == 1
    data = json.loads((out / "report.json").read_text())
    assert set(data["per_video"]) == {"id_a--id_b"}
    assert set(data["metrics"]) == {"lse_c", "lse_d", "csim"}
    assert set(data["reference"]) == {"lse_c", "lse_d", "csim"}
    row = data["per_video"]["id_a--id_b"]
    assert row["frames"] == 15 and all(np.isfinite(row[k]) for k in ("lse_c", "lse_d", "csim", "csim_real"))
    assert data["settings"]["generation"]["jobs"] == {"id_a--id_b": {"audio_id": "id_a", "ref_id": "id_b"}}
    # the driving audio is a's, the real clip is b's frames with b's own audio
    speech_a = load_audio(dataset["data"] / "id_a.mp4")[: 15 * 640]
    assert np.allclose(load_audio(out / "audio" / "id_a--id_b.wav"), speech_a, atol=1e-3)
    real, _ = read_video(out / "real" / "id_a--id_b.mp4")
    wide, _ = read_video(dataset["data"] / "id_b.mp4")
    assert _psnr(real, wide[:15, :, 32:288]) > 35
    assert report["settings"]["metrics_run"] == ["lse", "csim"]


# ----------------------------------------------------------------------------- pieces
def test_ids_pairs_and_the_default_metric_pools(tmp_path):
    (tmp_path / "pairs.txt").write_text("a b\n# comment\nb c   # trailing\n")
    assert protocols.read_pairs(tmp_path / "pairs.txt") == [("a", "b"), ("b", "c")]
    assert protocols.auto_pairs(["a", "b", "c"]) == [("a", "b"), ("b", "c"), ("c", "a")]
    (tmp_path / "split.txt").write_text("x\n  y  \n# z\n")
    assert protocols.read_ids(tmp_path / "split.txt") == ["x", "y"]
    args = build_parser().parse_args(["--protocol", "cross_identity"])
    assert protocols._select(args, None) == (None, protocols.NO_REFERENCE)
    assert set(protocols.NO_REFERENCE) == {"lse", "csim", "cpbd"}
    with pytest.raises(UserError, match="drop psnr"):
        protocols._select(args, ["psnr", "lse"])


def test_bad_inputs_are_one_line_and_write_nothing(dataset, capsys, count_runs, tmp_path):
    root = dataset["root"]
    out = tmp_path / "out"

    def err(protocol: str, *extra: str) -> str:
        return _cli_error(_argv(dataset, protocol, out, *extra), capsys)

    bad_split = root / "bad_split.txt"
    bad_split.write_text("id_a id_b\n")
    assert "one id per line" in err("hdtf_selfrecon", "--split_file", str(bad_split))
    missing = root / "missing.txt"
    missing.write_text("id_a\nid_zz\n")
    msg = err("hdtf_selfrecon", "--split_file", str(missing))
    assert "1 id(s)" in msg and "id_zz" in msg and "no video" in msg
    assert "split file not found" in err("hdtf_selfrecon", "--split_file", str(root / "nope.txt"))
    msg = err("hdtf_selfrecon")  # no --split_file: the shipped HDTF test split, whose ids --data lacks
    assert "98 id(s)" in msg and "hdtf_test_ids.txt" in msg and "RD_Radio46_000" in msg
    (root / "empty.txt").write_text("# nothing\n")
    assert "lists nothing" in err("hdtf_selfrecon", "--split_file", str(root / "empty.txt"))
    unknown = root / "unknown_pairs.txt"
    unknown.write_text("id_a id_b\nid_q id_a\n")
    msg = err("cross_identity", "--pairs", str(unknown))
    assert "id_q" in msg and "no video" in msg
    malformed = root / "malformed_pairs.txt"
    malformed.write_text("id_a\n")
    assert "expected 'audio_id ref_id'" in err("cross_identity", "--pairs", str(malformed))
    itself = root / "self_pairs.txt"
    itself.write_text("id_a id_a\n")
    assert "with itself" in err("cross_identity", "--pairs", str(itself))
    assert "hdtf_test_ids.txt" in err("cross_identity", "--pairs", "auto")
    assert "needs --pairs" in err("cross_identity")
    only_a = root / "only_a.txt"
    only_a.write_text("id_a\n")
    assert "at least two" in err("cross_identity", "--pairs", "auto", "--split_file", str(only_a))
    split = ["--split_file", str(dataset["split"])]
    assert "drop psnr" in err("cross_identity", "--pairs", "auto", *split, "--metrics", "psnr")
    assert "atom.stesp" in err("hdtf_selfrecon", *split, "--set", "atom.stesp=3")
    assert "set for each video" in err("hdtf_selfrecon", *split, "--set", "out=x.mp4")
    assert "--max_videos" in err("hdtf_selfrecon", *split, "--max_videos", "0")
    assert "name it .json" in err("hdtf_selfrecon", *split, "--json", str(tmp_path / "r.txt"))
    assert "--seconds" in err("hdtf_selfrecon", *split, "--seconds", "-1")
    assert "drop --pred" in err("hdtf_selfrecon", *split, "--pred", str(root))
    assert "is the --data folder" in _cli_error(
        [*_argv(dataset, "hdtf_selfrecon", dataset["data"]), *split], capsys
    )
    silent = root / "silent"
    silent.mkdir()
    write_video(silent / "id_a.mp4", reference_frames(5))
    write_video(silent / "id_b.mp4", reference_frames(5))
    argv = _argv(dataset, "hdtf_selfrecon", out, *split)
    argv[argv.index("--data") + 1] = str(silent)
    assert "no audio track" in _cli_error(argv, capsys)
    assert "need(s) --protocol" in _cli_error(["--pred", "a", "--gt", "b", "--data", "x"], capsys)
    assert not out.exists() and count_runs == []
