"""Motion alignment against the official aligner's recorded intermediates (fixtures/face3d_seed0.pt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_fixture

from data import motion_align as ma
from moditalker.errors import UserError


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_fixture("face3d_seed0.pt")


def _err(a, b) -> float:
    return (
        (torch.as_tensor(np.asarray(a)).double() - torch.as_tensor(np.asarray(b)).double()).abs().max().item()
    )


def test_standalone_rotation_and_rigid(fx):
    sa = fx["motion_align_standalone"]
    rot = ma.compute_rotation_matrix(sa["angles"])
    assert _err(rot, sa["rotation"]) < 1e-6
    assert _err(ma.rigid_transform(sa["vs"], sa["rotation"], sa["translation"]), sa["rigid_transform"]) < 1e-6
    # a rotation: orthonormal with determinant 1
    assert _err(rot @ rot.transpose(1, 2), torch.eye(3).expand(len(rot), 3, 3)) < 1e-5
    assert _err(torch.linalg.det(rot), torch.ones(len(rot))) < 1e-5


def test_intermediates_match_official(fx):
    m = fx["motion_align"]
    inp, mid = m["inputs"], m["intermediates"]
    hw = tuple(m["config"]["frame_hw"])
    coeff = inp["recon_coeff_257"].numpy()
    fan = inp["fa_lm68_per_frame"].numpy()
    std = inp["lm3d_std_5x3"].numpy()
    assert _err(ma.lm68_to_lm5(inp["similarity_Lm3D_all_lm_68x3"].numpy()), std) == 0
    for call in mid["lm68_2_lm5.calls"]:
        assert _err(ma.lm68_to_lm5(call["in"].numpy()), call["out"]) == 0
    rot = ma.compute_rotation_matrix(coeff[:, 224:227])
    assert _err(rot, mid["compute_rotation_matrix.out"]) < 1e-6
    posed = ma.rigid_transform(inp["atom_frontal_lm3d"], rot, coeff[:, 254:257])
    assert _err(posed, mid["rigid_transform.out"]) < 1e-6
    t, s = ma.pose_params(fan, std, hw)
    assert _err(s, mid["pose_extract.s"]) < 1e-9
    assert _err(t[:, 0], mid["pose_extract.t"][:, 0, 0]) < 1e-9
    # t_y: the original flips y with the height read from a CHW shape as "(_, W, H)", i.e. with the
    # width on non-square frames; the snap cancels it either way (only s reaches the result)
    t_swapped, _ = ma.pose_params(fan, std, hw[::-1])
    assert (
        min(
            _err(t[:, 1], mid["pose_extract.t"][:, 1, 0]),
            _err(t_swapped[:, 1], mid["pose_extract.t"][:, 1, 0]),
        )
        < 1e-9
    )
    lm224 = ma.project_to_crop(posed)
    assert lm224.dtype == np.int64 and _err(lm224, mid["de_aligning_ldmk.lm68_224"]) == 0
    # the original mixes up frames' crop sizes here (see de_align); only a per-frame constant differs
    offset = ma.de_align(lm224, t, s, hw) - mid["de_aligning_ldmk.out"].numpy()
    assert np.ptp(offset, axis=1).max() < 1e-9


def test_align_and_render_match_official(fx):
    m = fx["motion_align"]
    inp, out = m["inputs"], m["outputs"]
    hw = tuple(m["config"]["frame_hw"])
    args = (
        inp["atom_frontal_lm3d"].numpy(),
        inp["fa_lm68_per_frame"].numpy(),
        inp["recon_coeff_257"].numpy(),
        inp["lm3d_std_5x3"].numpy(),
        hw,
    )
    lm_float = ma.align_landmarks(*args, return_float=True)
    assert _err(lm_float, m["intermediates"]["_change_np_img_size.lm"]) < 1e-9
    lm = ma.align_landmarks(*args)
    assert lm.dtype == np.int64
    np.testing.assert_array_equal(lm, out["lm68_2d_int"].numpy())
    video = ma.render_landmarks(lm, hw, size=m["config"]["canvas"])
    assert video.dtype == np.uint8 and video.shape == tuple(out["land_vid_uint8"].shape)
    np.testing.assert_array_equal(video, out["land_vid_uint8"].numpy())  # pixel for pixel


def test_snap_and_errors(fx):
    rng = np.random.default_rng(0)
    lm = rng.uniform(0, 100, (3, 68, 2))
    target = rng.uniform(0, 100, (3, 68, 2))
    snapped = ma.snap_to(lm, target)
    np.testing.assert_allclose(ma.lm68_to_lm5(snapped).mean(1), ma.lm68_to_lm5(target).mean(1), atol=1e-9)
    np.testing.assert_allclose(snapped - lm, np.repeat((snapped - lm)[:, :1], 68, 1))  # a pure shift
    five = ma.lm68_to_lm5(np.arange(136).reshape(68, 2))  # int input: eye centres stay fractional
    assert five.dtype == np.float64 and five[0].tolist() == [75.0, 76.0]
    m = fx["motion_align"]["inputs"]
    with pytest.raises(UserError, match="per frame"):
        ma.align_landmarks(
            m["atom_frontal_lm3d"],
            m["fa_lm68_per_frame"][:2],
            m["recon_coeff_257"],
            m["lm3d_std_5x3"],
            (128, 128),
        )
    nan = m["fa_lm68_per_frame"].clone()
    nan[1, 3, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        ma.align_landmarks(m["atom_frontal_lm3d"], nan, m["recon_coeff_257"], m["lm3d_std_5x3"], (128, 128))
    with pytest.raises(UserError, match="68, 3"):
        ma.align_landmarks(
            np.zeros((4, 68, 2)), m["fa_lm68_per_frame"], m["recon_coeff_257"], m["lm3d_std_5x3"], (128, 128)
        )


def test_pingpong_indices():
    assert ma.pingpong_indices(4, 10).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert ma.pingpong_indices(1, 3).tolist() == [0, 0, 0]
    assert ma.pingpong_indices(5, 3).tolist() == [0, 1, 2]
    with pytest.raises(UserError):
        ma.pingpong_indices(0, 3)


# ----------------------------------------------------------------------------- CLI
def _inputs(tmp_path, n_ref: int = 3, t: int = 7):
    from data.face3d import canonical_face_lm68
    from data.video import write_video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n_ref, 48, 64, 3), dtype=np.uint8)  # non-square: centre-cropped
    write_video(tmp_path / "ref.mp4", frames, fps=25)
    lm = (canonical_face_lm68()[None] + rng.normal(0, 0.01, (t, 68, 3))).astype(np.float32)
    np.save(tmp_path / "atom.npy", lm)
    return frames, lm


def test_cli_random_weights_plays_reference_back_and_forth(tmp_path, capsys):
    import cv2

    from data.video import probe
    from moditalker.errors import cli_main

    _, lm = _inputs(tmp_path)
    out = tmp_path / "out"
    argv = ["--landmarks", str(tmp_path / "atom.npy"), "--reference", str(tmp_path / "ref.mp4")]
    argv += ["--out_dir", str(out), "--size", "64", "--random_weights", "--device", "cpu"]
    result = ma.main(argv)
    assert "WARNING: --random_weights: Deep3DFaceRecon is RANDOMLY" in capsys.readouterr().err
    aligned = np.load(out / "aligned_lm68.npy")
    assert aligned.shape == (7, 68, 2) and aligned.dtype == np.int64
    assert np.load(out / "reference_index.npy").tolist() == [0, 1, 2, 1, 0, 1, 2]
    coeff, lm68 = np.load(out / "reference_coeff.npy"), np.load(out / "reference_lm68.npy")
    assert coeff.shape == (3, 257) and lm68.shape == (3, 68, 2)
    # the CLI result is exactly the library pipeline on the played-back reference
    idx = result["ref_index"]
    np.testing.assert_array_equal(aligned, ma.align_landmarks(lm, lm68[idx], coeff[idx], _std(), (64, 64)))
    pngs = sorted((out / "landmarks_png").glob("*.png"))
    assert len(pngs) == 7
    np.testing.assert_array_equal(cv2.imread(str(pngs[4]), cv2.IMREAD_GRAYSCALE), result["video"][4, 0])
    assert (result["video"] > 0).any() and set(np.unique(result["video"])) <= {0, 255}
    assert probe(out / "landmarks.mp4")["video"]["frames"] == 7
    assert (out / "config.yaml").is_file()
    with pytest.raises(UserError, match="overwrite"):
        ma.main(argv)
    with pytest.raises(SystemExit) as exc:
        cli_main(ma.main, argv)
    assert exc.value.code == 2
    ma.main(argv + ["--overwrite", "--no_video"])
    # the side files are outputs too: a folder holding one of them (the aligned array removed) is refused
    (out / "aligned_lm68.npy").unlink()
    kept = (out / "reference_lm68.npy").read_bytes()
    with pytest.raises(UserError, match="reference_lm68.npy already exists"):
        ma.main(argv + ["--no_video", "--no_png"])
    assert (out / "reference_lm68.npy").read_bytes() == kept and not (out / "aligned_lm68.npy").exists()


def _std() -> np.ndarray:
    from data.face3d import canonical_face_lm68

    return ma.lm68_to_lm5(canonical_face_lm68())


def test_cli_frames_folder_and_bad_inputs(tmp_path):
    import cv2

    frames, lm = _inputs(tmp_path, n_ref=2, t=3)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:05d}.png"), f[..., ::-1])
    out = tmp_path / "out"
    base = ["--out_dir", str(out), "--size", "32", "--random_weights", "--device", "cpu", "--no_video"]
    ma.main(["--landmarks", str(tmp_path / "atom.npy"), "--reference", str(folder), *base])
    assert np.load(out / "aligned_lm68.npy").shape == (3, 68, 2)
    base.append("--overwrite")
    np.save(tmp_path / "bad.npy", np.zeros((3, 68, 2), np.float32))
    with pytest.raises(UserError, match=r"\[T, 68, 3\]"):
        ma.main(["--landmarks", str(tmp_path / "bad.npy"), "--reference", str(folder), *base])
    with pytest.raises(UserError, match="not found"):
        ma.main(["--landmarks", str(tmp_path / "atom.npy"), "--reference", str(tmp_path / "nope.mp4"), *base])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        ma.main(["--landmarks", str(tmp_path / "atom.npy"), "--reference", str(tmp_path / "empty"), *base])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--audio", "TEXT"], "cannot read audio"),
        (["--audio", "MISSING"], "audio file not found"),
        (["--fps", "0"], "--fps must be a positive number"),
        (["--fps", "nan"], "--fps must be a positive number"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--max_gap", "-1"], "--max_gap must be >= 0"),
    ],
)
def test_cli_bad_arguments_fail_before_writing(tmp_path, capsys, extra, message):
    """A bad --audio failed only after aligned_lm68.npy, the reference arrays and the PNGs had been
    written (partial output, exit 2); --fps 0 exited 0, --fps -1/nan and --batch_size 0 were
    tracebacks. Now: one line, exit 2, nothing in the output folder."""
    from moditalker.errors import cli_main

    _inputs(tmp_path)
    (tmp_path / "text.wav").write_text("not audio")
    swap = {"TEXT": str(tmp_path / "text.wav"), "MISSING": str(tmp_path / "nope.wav")}
    out = tmp_path / "out"
    argv = ["--landmarks", str(tmp_path / "atom.npy"), "--reference", str(tmp_path / "ref.mp4")]
    argv += ["--out_dir", str(out), "--size", "32", "--random_weights", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        cli_main(ma.main, argv + [swap.get(e, e) for e in extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())
