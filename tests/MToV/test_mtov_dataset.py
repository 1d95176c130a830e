"""MToV HDTF-style clip dataset on the synthetic tree: splits, windows, the four clips, short videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mtov_synth import write_synthetic_hdtf

from data.imageops import mask_below_nose, resize_crop
from data.motion_align import render_landmarks
from moditalker.errors import UserError
from MToV.dataset import HDTFClipDataset, read_rgb, select_ids


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_hdtf(tmp_path_factory.mktemp("hdtf"), n_frames=[20, 24, 18])


def test_split_semantics(synth):
    train = HDTFClipDataset(synth.root, "train", synth.split_file, timesteps=8, resolution=16)
    test = HDTFClipDataset(synth.root, "test", synth.split_file, timesteps=8, resolution=16)
    assert sorted(v for v, _ in train.videos) == sorted(synth.train_ids)
    assert [v for v, _ in test.videos] == list(synth.heldout_ids)
    # the file listing training ids instead
    flipped = HDTFClipDataset(synth.root, "train", synth.split_file, "train", timesteps=8, resolution=16)
    assert [v for v, _ in flipped.videos] == list(synth.heldout_ids)
    everything = HDTFClipDataset(synth.root, "all", synth.split_file, timesteps=8, resolution=16)
    assert len(everything) == 3
    assert select_ids(["a", "b"], "train", None, "heldout") == ["a", "b"]


def test_item_matches_the_shared_toolkit(synth):
    """Every clip is built exactly from data.imageops / data.motion_align, as the original builds it."""
    t, s = 8, 32
    ds = HDTFClipDataset(synth.root, "test", synth.split_file, timesteps=t, resolution=s, clips_per_video=2)
    assert ds.random_window is False and len(ds) == 2
    item = ds[1]
    vid = synth.heldout_ids[0]
    start = synth.n_frames[vid] - t  # second of two evenly spaced windows = the last one
    assert item["id"] == vid and item["start"] == start
    frames = np.stack([read_rgb(synth.frames_dir / vid / f"{i:05d}.png") for i in range(start, start + t)])
    lm = np.stack([np.load(synth.keypoints_dir / vid / f"{i:05d}.npy") for i in range(start, start + t)])
    x = torch.from_numpy(resize_crop(frames.astype(np.float32), s)).permute(3, 0, 1, 2) / 127.5 - 1
    masked = resize_crop(mask_below_nose(frames, lm).astype(np.float32), s)
    dots = render_landmarks(lm, frames.shape[1:3], size=s)
    for key in ("x", "x_ref", "x_l", "masked_x"):
        assert item[key].shape == (3, t, s, s) and item[key].dtype == torch.float32, key
        assert item[key].min() >= -1 and item[key].max() <= 1, key
    torch.testing.assert_close(item["x"], x, rtol=0, atol=1e-6)
    torch.testing.assert_close(item["x_ref"], x[:, :1].expand(-1, t, -1, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(item["masked_x"], torch.from_numpy(masked).permute(3, 0, 1, 2) / 127.5 - 1)
    torch.testing.assert_close(item["x_l"], torch.from_numpy(dots).permute(1, 0, 2, 3).float() / 127.5 - 1)
    # masking really removed the mouth region and the dots are binary
    assert (item["masked_x"][:, :, -2:] == -1).all() and not (item["x"][:, :, -2:] == -1).all()
    assert set(item["x_l"].unique().tolist()) == {-1.0, 1.0}


def test_random_windows_and_keys(synth):
    torch.manual_seed(0)
    ds = HDTFClipDataset(synth.root, "train", synth.split_file, timesteps=8, resolution=16, keys=("x",))
    assert ds.random_window is True
    starts = {ds[0]["start"] for _ in range(30)}
    assert len(starts) > 3 and max(starts) <= synth.n_frames[ds.videos[0][0]] - 8
    assert set(ds[0]) == {"id", "start", "x"}
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch["x"].shape == (2, 3, 8, 16, 16)


def test_short_videos(synth):
    with pytest.warns(UserWarning, match="shorter than 22"):
        ds = HDTFClipDataset(synth.root, "all", timesteps=22, resolution=16)
    assert [v for v, _ in ds.videos] == [synth.ids[1]]  # 24 frames; the 20- and 18-frame ones skipped
    padded = HDTFClipDataset(synth.root, "test", synth.split_file, timesteps=22, resolution=16,
                             short_videos="pad")  # fmt: skip
    item = padded[0]
    assert item["x"].shape == (3, 22, 16, 16)
    assert (item["x"][:, :4] == -1).all() and (item["x_l"][:, :4] == -1).all()  # 18 frames: 4 padded
    assert not (item["x"][:, 4] == -1).all()
    torch.testing.assert_close(item["x_ref"][:, 0], item["x"][:, 4])


def test_user_errors(synth, tmp_path):
    with pytest.raises(UserError, match="frames folder not found"):
        HDTFClipDataset(tmp_path)
    with pytest.raises(UserError, match="split file not found"):
        HDTFClipDataset(synth.root, split_file=tmp_path / "nope.txt")
    with pytest.raises(UserError, match="no usable videos"), pytest.warns(UserWarning):
        HDTFClipDataset(synth.root, "train", timesteps=100)
    (tmp_path / "frames" / "v").mkdir(parents=True)
    (tmp_path / "keypoints" / "non-face-centric" / "posed" / "v").mkdir(parents=True)
    import cv2

    for i in range(4):
        cv2.imwrite(str(tmp_path / "frames" / "v" / f"{i:05d}.png"), np.zeros((8, 8, 3), np.uint8))
    ds = HDTFClipDataset(tmp_path, "all", timesteps=4, resolution=8)
    with pytest.raises(UserError, match="keypoints missing"):
        ds[0]
