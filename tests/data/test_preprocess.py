"""data.preprocess: HDTF and LRS3 builders end to end on a generated 2-second video.

The learned parts are the project's own classes with stand-ins injected: ``FaceLandmarkDetector``
with a scripted detector (a face layout that drifts; optionally frames without a face),
``FaceReconstructor(random_weights=True)`` on a synthetic BFM, and a tiny random HuBERT.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.audio import HubertExtractor, hubert_num_frames
from data.face3d import Face3DHelper, canonical_face_lm68, write_synthetic_bfm
from data.imageops import resize_crop
from data.motion_align import align_landmarks, compute_rotation_matrix, lm68_to_lm5, rigid_transform
from data.preprocess import (
    KEYPOINT_DIRS,
    Toolkit,
    build_hdtf,
    build_lrs3,
    find_sources,
    main,
    npz_name,
    select_shard,
)
from data.video import read_video, write_video
from moditalker.errors import UserError, cli_main

N_FRAMES = 50  # 2 s at 25 fps
HUBERT_DIM = 32


def _video_frames(n: int, h: int, w: int, seed: int = 0, faceless: tuple[int, ...] = ()) -> np.ndarray:
    """A bright ellipse ("head") that drifts over a dark textured background (absent in ``faceless``)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    background = (rng.uniform(0, 60, (h, w, 3))).astype(np.uint8)
    frames = np.repeat(background[None], n, axis=0)
    for t in range(n):
        cx, cy = w / 2 + 6 * np.sin(t / 8), h / 2 + 3 * np.cos(t / 6)
        inside = ((xx - cx) / (0.3 * w)) ** 2 + ((yy - cy) / (0.4 * h)) ** 2 < 1
        if t not in faceless:
            frames[t][inside] = (200, 160, 130)
    return frames


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (
        0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
        + 0.02 * rng.standard_normal(len(t))
    ).astype(np.float32)


class ScriptedDetector:
    """Places the face layout on the bright ellipse of each frame (its centroid and height).

    Works frame by frame from the pixels (so batching does not matter); a frame without the
    ellipse has no face, and ``no_face=True`` finds none anywhere.
    """

    def __init__(self, no_face: bool = False):
        self.face = canonical_face_lm68()[:, :2]
        self.no_face = no_face

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        ys, xs = np.nonzero(frame[..., 0] > 150)
        if self.no_face or len(ys) < 50:
            return None
        r = 0.3 * (ys.max() - ys.min())
        return np.stack([xs.mean() + r * self.face[:, 0], ys.mean() - r * self.face[:, 1]], 1).astype(
            np.float32
        )

    def __call__(self, frames: np.ndarray) -> list:
        return [self.landmarks(frame) for frame in frames]


def _toolkit(bfm_dir, detector: ScriptedDetector, hubert: bool = True) -> Toolkit:
    from data.landmarks import FaceLandmarkDetector
    from data.recon3d import FaceReconstructor

    return Toolkit(
        detector=FaceLandmarkDetector(device="cpu", detector=detector),
        reconstructor=FaceReconstructor(bfm_dir=bfm_dir, device="cpu", random_weights=True),
        face3d=Face3DHelper(bfm_dir),
        hubert=HubertExtractor.random(hidden_size=HUBERT_DIM, conv_dim=8) if hubert else None,
    )


@pytest.fixture(scope="module")
def bfm_dir(tmp_path_factory):
    return write_synthetic_bfm(tmp_path_factory.mktemp("bfm"), seed=0)


@pytest.fixture(scope="module")
def toolkit(bfm_dir):
    return _toolkit(bfm_dir, ScriptedDetector())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """HDTF-style input folder: a 2 s 320x240 clip with speech, and a 3-frame clip in {id}/video.mp4."""
    root = tmp_path_factory.mktemp("videos")
    frames = _video_frames(N_FRAMES, 240, 320, faceless=(7,))
    write_video(root / "WRA_Test_000.mp4", frames, fps=25, audio=_speech(2.0))
    (root / "WDA_Short_001").mkdir()
    write_video(
        root / "WDA_Short_001" / "video.mp4", _video_frames(3, 240, 320, seed=1), fps=25, audio=_speech(0.12)
    )
    return root


# ------------------------------------------------------------------------------------------------
# helpers


def test_find_sources_and_shards(tmp_path, videos):
    sources = find_sources(videos)
    assert sorted(sources) == ["WDA_Short_001", "WRA_Test_000"]
    assert sources["WDA_Short_001"].name == "video.mp4"
    frames_dir = tmp_path / "frames_in" / "idA"
    frames_dir.mkdir(parents=True)
    (frames_dir / "00000.jpg").write_bytes(b"")
    assert find_sources(tmp_path / "frames_in") == {"idA": frames_dir}
    ids = [f"id{i}" for i in range(7)]
    parts = [select_shard(ids, k, 3) for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids) and all(parts)
    assert not set(parts[0]) & set(parts[1])
    with pytest.raises(UserError, match="shard"):
        select_shard(ids, 3, 3)
    with pytest.raises(UserError, match="not found"):
        find_sources(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# HDTF


@pytest.fixture(scope="module")
def hdtf_run(tmp_path_factory, videos, toolkit):
    out = tmp_path_factory.mktemp("hdtf")
    sources = find_sources(videos)
    report = build_hdtf(sources, out, toolkit, hubert=True, progress=False)
    return out, report


def test_hdtf_tree(hdtf_run, videos, toolkit, bfm_dir):
    out, report = hdtf_run
    assert sorted(report["done"]) == ["WDA_Short_001", "WRA_Test_000"] and not report["failed"]
    vid = "WRA_Test_000"
    meta = json.loads((out / "meta" / f"{vid}.json").read_text())
    assert meta["n_frames"] == N_FRAMES and meta["size"] == 256 and meta["n_interpolated"] == 1
    frames = sorted((out / "frames" / vid).glob("*.jpg"))
    assert [f.name for f in frames[:2]] == ["00000.jpg", "00001.jpg"] and len(frames) == N_FRAMES
    for key, rel in KEYPOINT_DIRS.items():
        files = sorted((out / rel / vid).glob("*.npy"))
        assert len(files) == N_FRAMES, key
    load = lambda key: np.stack(
        [np.load(out / KEYPOINT_DIRS[key] / vid / f"{i:05d}.npy") for i in range(N_FRAMES)]
    )
    unposed, posed, nfc, fa = load("unposed"), load("posed"), load("nfc"), load("fa")
    coeff = np.load(out / "coeff" / f"{vid}.npy")
    assert unposed.shape == (N_FRAMES, 68, 3) and posed.shape == (N_FRAMES, 68, 3)
    assert nfc.shape == fa.shape == (N_FRAMES, 68, 2) and coeff.shape == (N_FRAMES, 257)
    assert all(a.dtype == np.float32 for a in (unposed, posed, nfc, fa, coeff))

    # The frames are the 25 fps decode, centre-cropped and resized to 256 (JPEG tolerance).
    src = resize_crop(read_video(videos / f"{vid}.mp4", fps=25)[0], 256)
    from PIL import Image

    first = np.asarray(Image.open(frames[0]))
    assert first.shape == (256, 256, 3)
    assert np.abs(first.astype(int) - src[0].astype(int)).mean() < 3

    # FAN landmarks: the scripted ones on the 256 frames; frame 7 (no face) interpolated.
    det = ScriptedDetector()
    np.testing.assert_allclose(fa[6], det.landmarks(src[6]), atol=1e-3)
    np.testing.assert_allclose(fa[7], (det.landmarks(src[6]) + det.landmarks(src[8])) / 2, atol=1e-3)

    # Keypoint spaces follow from the saved coefficients, frame by frame.
    helper = Face3DHelper(bfm_dir)
    idexp = helper.reconstruct_idexp_lm3d(coeff[:, :80], coeff[:, 80:144]).numpy()
    np.testing.assert_allclose(unposed, idexp / 10 + helper.key_mean_shape.numpy(), atol=1e-6)
    rot = compute_rotation_matrix(coeff[:, 224:227])
    np.testing.assert_allclose(posed, rigid_transform(unposed, rot, coeff[:, 254:257]).numpy(), atol=1e-6)
    expect = align_landmarks(unposed, fa, coeff, toolkit.reconstructor.lm3d_std, (256, 256))
    np.testing.assert_array_equal(nfc, expect.astype(np.float32))
    # ... and the non-face-centric points sit on the face: 5-point centroids agree within truncation.
    gap = np.abs(lm68_to_lm5(nfc).mean(1) - lm68_to_lm5(fa).mean(1))
    assert gap.max() <= 1.0
    assert (nfc >= 0).all() and (nfc < 256).all()
    # HuBERT of the video's audio track (2 s, AAC) and the 16 kHz wav next to it
    hub = np.load(out / "hubert" / f"{vid}.npy")
    assert hub.shape[1] == HUBERT_DIM and abs(hub.shape[0] - 2 * N_FRAMES) <= 2
    assert meta["hubert_frames"] == hub.shape[0]
    assert (out / "audio" / f"{vid}.wav").is_file()


def test_hdtf_resume_overwrite_and_leftovers(hdtf_run, videos, toolkit):
    out, _ = hdtf_run
    sources = find_sources(videos)
    marker = out / "frames" / "WRA_Test_000" / "00000.jpg"
    before = marker.stat().st_mtime_ns
    again = build_hdtf(sources, out, toolkit, progress=False)
    assert again["done"] == [] and sorted(again["skipped"]) == sorted(sources)
    assert marker.stat().st_mtime_ns == before
    # an interrupted id (no meta) is redone from scratch, stale files removed
    short = "WDA_Short_001"
    (out / "meta" / f"{short}.json").unlink()
    stale = out / KEYPOINT_DIRS["nfc"] / short / "00099.npy"
    np.save(stale, np.zeros((68, 2), np.float32))
    redo = build_hdtf(sources, out, toolkit, progress=False)
    assert redo["done"] == [short] and not stale.exists()
    assert len(list((out / "frames" / short).glob("*.jpg"))) == 3
    # --overwrite redoes finished ids
    forced = build_hdtf({short: sources[short]}, out, toolkit, overwrite=True, progress=False)
    assert forced["done"] == [short]


def test_hdtf_frames_already_in_the_tree_are_kept(tmp_path, videos, toolkit):
    """Original two-step workflow: frames extracted to {out}/frames/{id} first, then keypoints in place."""
    from PIL import Image

    frames = resize_crop(_video_frames(3, 240, 320), 256)
    folder = tmp_path / "frames" / "idA"
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.png")
    stamps = sorted(p.stat().st_mtime_ns for p in folder.iterdir())
    report = build_hdtf(find_sources(tmp_path / "frames"), tmp_path, toolkit, progress=False)
    assert report["done"] == ["idA"]
    assert sorted(p.stat().st_mtime_ns for p in folder.iterdir()) == stamps  # untouched, not re-encoded
    assert len(list((tmp_path / KEYPOINT_DIRS["nfc"] / "idA").glob("*.npy"))) == 3
    with pytest.raises(UserError, match="in place"):
        build_hdtf(
            find_sources(tmp_path / "frames"), tmp_path, toolkit, size=128, overwrite=True, fail_fast=True
        )


def test_hdtf_no_face_is_reported_and_run_continues(tmp_path, videos, bfm_dir):
    tk = _toolkit(bfm_dir, ScriptedDetector(no_face=True), hubert=False)
    sources = {"WDA_Short_001": find_sources(videos)["WDA_Short_001"]}
    report = build_hdtf(sources, tmp_path, tk, progress=False)
    assert list(report["failed"]) == ["WDA_Short_001"] and report["done"] == []
    assert not (tmp_path / "meta" / "WDA_Short_001.json").exists()
    with pytest.raises(UserError):
        build_hdtf(sources, tmp_path, tk, progress=False, fail_fast=True)


def test_hdtf_cli_random_weights_shards(tmp_path, videos, capsys):
    """CLI smoke run (random networks, synthetic BFM): two shards together cover every id once."""
    out = tmp_path / "cli"
    base = ["hdtf", "--videos", str(videos), "--out_dir", str(out), "--random_weights", "--device", "cpu"]
    base += ["--max_frames", "4", "--frame_format", "png"]
    r0 = main(base + ["--shard", "0", "--num_shards", "2"])
    assert "HuBERT and Deep3DFaceRecon are RANDOMLY" in capsys.readouterr().err.replace("#", " ").replace(
        "  ", " "
    )
    r1 = main(base + ["--shard", "1", "--num_shards", "2"])
    assert sorted(r0["done"] + r1["done"]) == ["WDA_Short_001", "WRA_Test_000"]
    assert len(r0["done"]) == len(r1["done"]) == 1
    assert len(list((out / "frames" / "WRA_Test_000").glob("*.png"))) == 4
    assert (out / "configs" / "hdtf_shard0of2.yaml").is_file()
    with pytest.raises(SystemExit) as exc:
        cli_main(main, base + ["--ids", "not_there"])
    assert exc.value.code == 2 and "not_there" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--size", "0"], "--size must be at least 32"),
        (["--fps", "nan"], "--fps must be a positive number"),
        (["--fps", "0"], "--fps must be a positive number"),
        (["--max_frames", "0"], "--max_frames must be >= 1"),
        (["--num_shards", "0"], "--num_shards must be >= 1, got 0"),
    ],
)
def test_hdtf_cli_bad_arguments_stop_before_any_work(tmp_path, videos, capsys, extra, message):
    """--size 0, --fps nan and --max_frames 0 were tracebacks after the networks were built; --fps 0
    exited 0; --num_shards 0 said '--shard must be in 0..-1'. Now one line, exit 2, nothing written."""
    out = tmp_path / "cli"
    argv = ["hdtf", "--videos", str(videos), "--out_dir", str(out), "--random_weights", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv + extra)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0], lines[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# LRS3


def test_lrs3_npz_clips(tmp_path, videos, toolkit, bfm_dir):
    root = tmp_path / "lrs3"
    (root / "trainval" / "spk1").mkdir(parents=True)
    clip = root / "trainval" / "spk1" / "00001.mp4"
    write_video(clip, _video_frames(N_FRAMES, 224, 224, seed=2), fps=25, audio=_speech(2.0, seed=2))
    (root / "trainval" / "spk1" / "00001.txt").write_text("Text: HELLO\n")
    sources = find_sources(root, recursive=True)
    assert list(sources) == ["trainval/spk1/00001"]
    out = tmp_path / "npz"
    report = build_lrs3(sources, out, toolkit, progress=False)
    assert report["done"] == ["trainval/spk1/00001"]
    path = out / npz_name("trainval/spk1/00001")
    assert path.name == "trainval_spk1_00001.npz"
    with np.load(path) as z:
        hub, idexp, coeff = z["hubert"], z["idexp_lm3d"], z["coeff"]
    from data.audio import load_audio

    n_audio = hubert_num_frames(len(load_audio(clip)))
    t = min(N_FRAMES, n_audio // 2)
    assert hub.shape == (2 * t, HUBERT_DIM) and idexp.shape == (t, 68, 3) and coeff.shape == (t, 257)
    assert hub.dtype == idexp.dtype == np.float32
    helper = Face3DHelper(bfm_dir)
    np.testing.assert_allclose(
        idexp, helper.reconstruct_idexp_lm3d(coeff[:, :80], coeff[:, 80:144]).numpy(), atol=1e-6
    )
    # HuBERT rows are the features of the clip's own audio track
    np.testing.assert_allclose(hub, toolkit.hubert(load_audio(clip))[: 2 * t], atol=1e-5)
    # resumable: a second run skips the clip
    assert build_lrs3(sources, out, toolkit, progress=False)["skipped"] == ["trainval/spk1/00001"]
    # AToM's trainer reads this folder as-is
    dataset = pytest.importorskip("AToM.dataset")
    src = dataset.NpzFolderSource(sorted(out.glob("*.npz")))
    assert list(src.lengths) == [t]
    h2, i2 = src.load(0)
    np.testing.assert_array_equal(i2, idexp)


def test_lrs3_too_short_clip_is_skipped(tmp_path, videos, toolkit):
    root = tmp_path / "lrs3"
    (root / "test" / "spk").mkdir(parents=True)
    write_video(root / "test" / "spk" / "00002.mp4", _video_frames(3, 224, 224), fps=25, audio=_speech(0.12))
    report = build_lrs3(
        find_sources(root, recursive=True), tmp_path / "npz", toolkit, min_frames=10, progress=False
    )
    assert list(report["failed"]) == ["test/spk/00002"] and "min_frames" in report["failed"]["test/spk/00002"]


@pytest.mark.slow
def test_shard_launcher_script(tmp_path, videos):
    """scripts/preprocess_hdtf.sh with NUM_SHARDS=2 runs two processes that together finish every id."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "preprocess_hdtf.sh"
    out = tmp_path / "sharded"
    cmd = ["bash", str(script), "--videos", str(videos), "--out_dir", str(out), "--random_weights"]
    cmd += ["--device", "cpu", "--max_frames", "3"]
    run = subprocess.run(
        cmd, env=dict(os.environ, NUM_SHARDS="2"), capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.stem for p in (out / "meta").glob("*.json")) == sorted(find_sources(videos))
    assert sorted(p.name for p in (out / "configs").iterdir()) == [
        "hdtf_shard0of2.yaml",
        "hdtf_shard1of2.yaml",
    ]
