"""Deep3DFaceRecon regressor: checkpoint layout, POS alignment to the 224 crop, batched inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.face3d import canonical_face_lm68, write_synthetic_bfm
from data.motion_align import lm68_to_lm5
from data.recon3d import FaceReconstructor, ReconNet, align_crop, load_lm3d_std
from moditalker.errors import UserError


@pytest.fixture(scope="module")
def bfm(tmp_path_factory):
    return write_synthetic_bfm(tmp_path_factory.mktemp("bfm"), seed=0)


@pytest.fixture(scope="module")
def recon(bfm) -> FaceReconstructor:
    return FaceReconstructor(random_weights=True, bfm_dir=bfm, batch_size=2)


def _face_frames(n: int, height: int = 200, width: int = 160, px_per_unit: float = 60.0):
    """Frames with a bright dot at each landmark of the canonical face, and those landmarks (y down)."""
    face = canonical_face_lm68()
    frames = np.full((n, height, width, 3), 30, np.uint8)
    lms = []
    for i in range(n):
        cx, cy = width / 2 + 3 * i, height / 2 - 2 * i
        lm = np.stack([cx + px_per_unit * face[:, 0], cy - px_per_unit * face[:, 1]], 1).astype(np.float32)
        for x, y in lm.astype(int):
            frames[i, y - 1 : y + 2, x - 1 : x + 2] = 250
        lms.append(lm)
    return frames, np.stack(lms)


def test_template_from_similarity_file(bfm):
    np.testing.assert_allclose(load_lm3d_std(bfm), lm68_to_lm5(canonical_face_lm68()), atol=1e-12)
    with pytest.raises(UserError, match="moditalker.assets check"):
        load_lm3d_std(bfm / "missing")


def test_align_crop_puts_face_on_template(recon):
    frames, lms = _face_frames(2)  # non-square frames: the crop must use the real height
    std = recon.lm3d_std
    for frame, lm in zip(frames, lms):
        crop, t, s, lm_crop = align_crop(frame, lm, std)
        assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
        assert s == pytest.approx(102 / 60, rel=1e-3)
        five = lm68_to_lm5(lm_crop)
        expected = np.stack([112 + 102 * std[:, 0], 112 - 102 * std[:, 1]], 1)
        np.testing.assert_allclose(five, expected, atol=1.5)
        # the bright dots really are where the crop landmarks say
        for x, y in lm_crop[[30, 36, 45, 48, 54]].round().astype(int):
            assert crop[y - 1 : y + 2, x - 1 : x + 2].max() > 150


def test_reconstruct_is_batched_and_deterministic(recon):
    frames, lms = _face_frames(3)
    coeff = recon.reconstruct(frames, lms)
    assert coeff.shape == (3, 257) and coeff.dtype == np.float32 and np.isfinite(coeff).all()
    assert np.abs(coeff[:, 224:227]).max() < 0.5  # random heads give small poses
    crops, t, s = recon.align(frames, lms)  # batches of 2 + 1 above vs all 3 at once here
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        np.testing.assert_allclose(recon.net(x).numpy(), coeff, atol=1e-5)
    with pytest.raises(UserError, match="68, 2"):
        recon.reconstruct(frames, lms[:2])
    bad = lms.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        recon.reconstruct(frames, bad)


def test_checkpoint_layouts(tmp_path, bfm, recon):
    state = recon.net.state_dict()
    assert state["backbone.conv1.weight"].shape == (64, 3, 7, 7)
    assert state["final_layers.0.weight"].shape == (80, 2048, 1, 1)
    assert state["final_layers.6.bias"].shape == (1,)
    assert not any(k.startswith("backbone.fc") for k in state)
    frames, lms = _face_frames(1)
    ref = recon.reconstruct(frames, lms)
    variants = {
        "official.pth": {"net_recon": state, "epoch": 20},
        # bare state_dict with a DataParallel prefix and no BatchNorm step counters
        "bare.pth": {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        loaded = FaceReconstructor(weights=tmp_path / name, bfm_dir=bfm)
        np.testing.assert_allclose(loaded.reconstruct(frames, lms), ref, atol=1e-6, err_msg=name)
    torch.save({"net_recon": {"conv.weight": torch.zeros(1)}}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="does not match"):
        FaceReconstructor(weights=tmp_path / "wrong.pth", bfm_dir=bfm)
    with pytest.raises(UserError, match="moditalker.assets check"):
        FaceReconstructor(weights=tmp_path / "absent.pth", bfm_dir=bfm)
    assert isinstance(recon.net, ReconNet)
