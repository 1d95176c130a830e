"""HDTF-style clip dataset for MToV training (both autoencoders and the latent diffusion UNet).

Tree (every folder name is an option)::

    {root}/frames/{id}/{frame:05d}.jpg|png                             RGB frames, any H x W
    {root}/keypoints/non-face-centric/posed/{id}/{frame:05d}.npy      [68, 2] pixel (x, y) per frame

One item is a window of ``timesteps`` consecutive frames of one video (random start for training,
evenly spaced fixed starts for evaluation), returned as float32 tensors ``[3, T, S, S]`` in
[-1, 1] (``uint8 / 127.5 - 1``, as the original):

* ``x``: the frames, centre-cropped to a square and bilinearly resized to ``S`` (``resize_crop``);
* ``x_ref``: the window's first frame repeated ``T`` times (the reference clip);
* ``x_l``: the landmark video, white dots of radius 3 on black at ``S x S``, coordinates scaled by
  ``S / W`` of the original frame (``render_landmarks``, as the original: no crop offset);
* ``masked_x``: the frames with every row from the nose base ``int(lm[33].y)`` down set to 0,
  masked at the original resolution with each frame's own landmarks, then resized.

plus ``id`` (str) and ``start`` (int). Only the keys asked for are computed (``keys=``).

Split file: one id per line. ``split_mode="heldout"`` (default, the original's semantics: its
``train_id.txt`` actually lists the 98 TEST ids) means listed ids are the test split and all other
ids train; ``split_mode="train"`` means the file lists the training ids. ``split="all"`` ignores it.

Videos shorter than the window: ``short_videos="skip"`` (default) leaves them out (with a warning);
``"pad"`` keeps them and pads the window at the FRONT with black frames (and empty landmark
frames), like the original's front zero-padding; the reference frame is then the first real frame.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data.imageops import mask_below_nose, resize_crop
from data.motion_align import render_landmarks
from moditalker.errors import UserError
from moditalker.training.bad_items import SkipUnreadable, check_items

ALL_KEYS = ("x", "x_ref", "x_l", "masked_x")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_FRAMES_DIR = "frames"
DEFAULT_KEYPOINTS_DIR = "keypoints/non-face-centric/posed"


def data_defaults(max_val_clips: int) -> dict:
    """The ``data`` section of the MToV trainers' configs (what :func:`build_dataset` reads)."""
    return {
        "root": None,
        "frames_dir": DEFAULT_FRAMES_DIR,
        "keypoints_dir": DEFAULT_KEYPOINTS_DIR,
        "split_file": None,
        "split_mode": "heldout",
        "short_videos": "skip",
        "landmark_radius": 3,
        "train_clips_per_video": 1,
        "val_clips_per_video": 1,
        "max_val_clips": max_val_clips,
        "num_workers": 4,
        "max_bad_items": 0.01,  # unreadable clips skipped with a warning: a fraction (< 1) or a count
    }


def read_split_file(path: str | Path) -> list[str]:
    """Ids listed one per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path} (set data.split_file, or null to use every id)")
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids


def select_ids(
    all_ids: Sequence[str], split: str, listed: Sequence[str] | None, split_mode: str
) -> list[str]:
    """The ids of ``split`` ("train", "test" or "all") given the listed ids and their meaning."""
    if split not in ("train", "test", "all"):
        raise UserError(f"split must be train, test or all, got {split!r}")
    if split_mode not in ("heldout", "train"):
        raise UserError(f"split_mode must be 'heldout' (file lists test ids) or 'train', got {split_mode!r}")
    if split == "all" or listed is None:
        return list(all_ids)
    listed_set = set(listed)
    in_list = split == ("test" if split_mode == "heldout" else "train")
    return [i for i in all_ids if (i in listed_set) == in_list]


def to_unit_range(frames: np.ndarray) -> torch.Tensor:
    """[T, S, S, 3] or [T, 3, S, S] uint8-range values -> float32 [3, T, S, S] in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
    if t.shape[-1] == 3:
        t = t.permute(3, 0, 1, 2)
    else:
        t = t.permute(1, 0, 2, 3)
    return t / 127.5 - 1


def read_rgb(path: Path) -> np.ndarray:
    """One image file -> uint8 [H, W, 3] RGB."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f"cannot read frame {path} (corrupt or not an image)")
    return img[:, :, ::-1]


class HDTFClipDataset(Dataset):
    """Windows of ``timesteps`` frames from an HDTF-style frames + keypoints tree (see module doc)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        split_file: str | Path | None = None,
        split_mode: str = "heldout",
        timesteps: int = 16,
        resolution: int = 256,
        keys: Sequence[str] = ALL_KEYS,
        frames_dir: str = DEFAULT_FRAMES_DIR,
        keypoints_dir: str = DEFAULT_KEYPOINTS_DIR,
        random_window: bool | None = None,
        clips_per_video: int = 1,
        short_videos: str = "skip",
        radius: int = 3,
    ) -> None:
        if root is None:
            raise UserError("no dataset root given (set data.root=/path/to/HDTF)")
        self.root = Path(root)
        self.frames_root = self.root / frames_dir
        self.kp_root = self.root / keypoints_dir
        self.timesteps = int(timesteps)
        self.resolution = int(resolution)
        self.keys = tuple(keys)
        bad = [k for k in self.keys if k not in ALL_KEYS]
        if bad or not self.keys:
            raise UserError(f"unknown dataset keys {bad}; choose from {ALL_KEYS}")
        self.random_window = split == "train" if random_window is None else bool(random_window)
        self.clips_per_video = int(clips_per_video)
        if short_videos not in ("skip", "pad"):
            raise UserError(f"short_videos must be 'skip' or 'pad', got {short_videos!r}")
        self.short_videos = short_videos
        self.radius = radius
        self._need_kp = any(k in self.keys for k in ("x_l", "masked_x"))

        if not self.frames_root.is_dir():
            raise UserError(
                f"frames folder not found: {self.frames_root} (expected {{root}}/{frames_dir}/{{id}}/)"
            )
        if self._need_kp and not self.kp_root.is_dir():
            raise UserError(
                f"keypoints folder not found: {self.kp_root} (expected {{root}}/{keypoints_dir}/{{id}}/; "
                "build it with the data preprocessing)"
            )
        all_ids = sorted(p.name for p in self.frames_root.iterdir() if p.is_dir())
        listed = read_split_file(split_file) if split_file else None
        ids = select_ids(all_ids, split, listed, split_mode)
        absent = sorted(set(listed or ()) - set(all_ids))
        if absent:
            warnings.warn(
                f"{len(absent)} id(s) of {split_file} have no folder in {self.frames_root}: "
                + ", ".join(absent[:5])
                + (" ..." if len(absent) > 5 else ""),
                stacklevel=2,
            )

        self.videos: list[tuple[str, list[Path]]] = []
        skipped = []
        for vid in ids:
            frames = sorted(
                p for p in (self.frames_root / vid).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not frames or (len(frames) < self.timesteps and short_videos == "skip"):
                skipped.append(f"{vid} ({len(frames)} frames)")
                continue
            self.videos.append((vid, frames))
        if skipped:
            warnings.warn(
                f"skipped {len(skipped)} video(s) shorter than {self.timesteps} frames: "
                + ", ".join(skipped[:5])
                + (" ..." if len(skipped) > 5 else "")
                + " (short_videos='pad' keeps them)",
                stacklevel=2,
            )
        if not self.videos:
            raise UserError(
                f"no usable videos for split {split!r} under {self.frames_root} "
                f"({len(all_ids)} ids found, {len(ids)} in the split, {len(skipped)} too short); "
                "check data.root, data.split_file and data.split_mode"
            )

    def __len__(self) -> int:
        return len(self.videos) * self.clips_per_video

    def name(self, index: int) -> str:
        """Item ``index`` in messages: its video's frames folder."""
        vid, paths = self.videos[index // self.clips_per_video]
        return str(paths[0].parent) if paths else vid

    def _start(self, n_frames: int, clip: int) -> int:
        return window_start(n_frames, self.timesteps, clip, self.clips_per_video, self.random_window)

    def _keypoints(self, vid: str, frame_paths: Sequence[Path]) -> np.ndarray:
        out = np.empty((len(frame_paths), 68, 2), np.float32)
        for i, fp in enumerate(frame_paths):
            kp_path = self.kp_root / vid / f"{fp.stem}.npy"
            if not kp_path.is_file():
                raise UserError(f"keypoints missing for frame {fp}: expected {kp_path}")
            kp = np.load(kp_path)
            if kp.shape != (68, 2):
                raise UserError(f"keypoints {kp_path} have shape {kp.shape}, expected (68, 2)")
            out[i] = kp  # a string or object array: a ValueError here
            if not np.isfinite(out[i]).all():
                raise UserError(f"keypoints {kp_path} hold NaN or Inf values (a failed landmark detection)")
        return out

    def __getitem__(self, index: int) -> dict:
        video = index // self.clips_per_video
        return self.clip(video, self._start(len(self.videos[video][1]), index % self.clips_per_video))

    def read_frames(self, video: int, first: int, stop: int) -> dict:
        """Frames ``first .. stop-1`` of video number ``video`` as the clips' per-frame tensors
        ``[3, F, S, S]`` (the keys asked for, no padding, no ``x_ref``): every step is per frame, so a
        window cut from them equals the same window read by :meth:`clip` (the latent cache reads a
        video once this way instead of once per window)."""
        vid, paths = self.videos[video]
        window = paths[first:stop]
        images = [read_rgb(p) for p in window]
        hw = images[0].shape[:2]
        if any(img.shape[:2] != hw for img in images):
            raise UserError(f"frames of {vid} differ in size ({window[0].parent})")
        frames = np.stack(images)
        lm = self._keypoints(vid, window) if self._need_kp else None
        s = self.resolution
        out: dict = {}
        if "x" in self.keys or "x_ref" in self.keys:
            out["x"] = to_unit_range(resize_crop(frames.astype(np.float32), s))
        if "masked_x" in self.keys:
            masked = mask_below_nose(frames, lm).astype(np.float32)
            out["masked_x"] = to_unit_range(resize_crop(masked, s))
        if "x_l" in self.keys:
            out["x_l"] = to_unit_range(render_landmarks(lm, hw, size=s, radius=self.radius))
        return out

    def clip(self, video: int, start: int) -> dict:
        """The item of the window of video number ``video`` that starts at frame ``start``."""
        vid, paths = self.videos[video]
        stop = min(start + self.timesteps, len(paths))
        per_frame = self.read_frames(video, start, stop)
        pad = self.timesteps - (stop - start)
        item: dict = {"id": vid, "start": start}
        for key in ("x", "masked_x", "x_l"):
            if key in self.keys:
                item[key] = _front_pad(per_frame[key], pad)
        if "x_ref" in self.keys:
            item["x_ref"] = per_frame["x"][:, :1].expand(-1, self.timesteps, -1, -1).contiguous()
        return item


def window_start(n_frames: int, timesteps: int, clip: int, clips_per_video: int, random_window: bool) -> int:
    """First frame of a window: uniform over ``0 .. n_frames - timesteps`` (training; torch's global
    generator), else clip ``clip`` of ``clips_per_video`` evenly spaced windows (evaluation)."""
    last = max(n_frames - timesteps, 0)
    if random_window:
        return int(torch.randint(0, last + 1, ()).item())
    if clips_per_video == 1:
        return 0
    return int(round(clip * last / (clips_per_video - 1)))


def _front_pad(clip: torch.Tensor, pad: int) -> torch.Tensor:
    """Prepend ``pad`` black frames (-1) on the time axis of [3, T, S, S]."""
    if pad <= 0:
        return clip
    black = torch.full((clip.shape[0], pad, *clip.shape[2:]), -1.0, dtype=clip.dtype)
    return torch.cat([black, clip], dim=1)


def build_dataset(
    data_cfg, split: str, keys: Sequence[str], timesteps: int, resolution: int, skip_unreadable: bool = True
) -> HDTFClipDataset | SkipUnreadable:
    """Construct the dataset from a config's ``data`` section (shared by both MToV trainers); with
    ``skip_unreadable`` an item that cannot be read is replaced by the next one (see
    :mod:`moditalker.training.bad_items`)."""
    get = data_cfg.get
    ds = HDTFClipDataset(
        root=get("root"),
        split=split,
        split_file=get("split_file", None),
        split_mode=get("split_mode", "heldout"),
        timesteps=timesteps,
        resolution=resolution,
        keys=keys,
        frames_dir=get("frames_dir", DEFAULT_FRAMES_DIR),
        keypoints_dir=get("keypoints_dir", DEFAULT_KEYPOINTS_DIR),
        random_window=None,
        clips_per_video=get("train_clips_per_video", 1)
        if split == "train"
        else get("val_clips_per_video", 1),
        short_videos=get("short_videos", "skip"),
        radius=get("landmark_radius", 3),
    )
    return SkipUnreadable(ds, ds.name) if skip_unreadable else ds


def check_data(data_cfg, keys: Sequence[str], timesteps: int, resolution: int) -> int:
    """The trainers' ``--check``: read every clip of both splits without training; prints one line per
    unreadable item and returns how many there were."""
    lines: list[str] = []
    seen: set[str] = set()
    for split in ("train", "test"):  # without a split file both splits hold every video: once each
        ds = build_dataset(data_cfg, split, keys, timesteps, resolution, skip_unreadable=False)
        ds.videos = [v for v in ds.videos if v[0] not in seen]
        seen.update(vid for vid, _ in ds.videos)
        lines += check_items(_WholeVideos(ds), lambda i, ds=ds: ds.name(i * ds.clips_per_video))
    for line in lines:
        print(f"unreadable: {line}")
    print(f"checked {len(seen)} videos: {len(lines)} unreadable")
    return len(lines)


class _WholeVideos:
    """Item i reads every frame (and keypoint file) of video i: what ``--check`` validates."""

    def __init__(self, ds: HDTFClipDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds.videos)

    def __getitem__(self, i: int) -> None:
        vid, paths = self.ds.videos[i]
        for p in paths:
            read_rgb(p)
        if self.ds._need_kp:
            self.ds._keypoints(vid, paths)
