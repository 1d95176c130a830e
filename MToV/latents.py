"""The MToV latent cache: what the frozen autoencoders make of every training window, computed once.

Diffusion training spends almost all of its compute re-encoding the same clips through the two frozen
tri-plane autoencoders (four 16-frame clips per sample and step). The latents are a deterministic
function of (video, window start), so :mod:`MToV.cache_latents` computes them once and training reads
them (``data.latents=DIR``, :class:`CachedWindowDataset`).

Layout of a cache folder::

    build.json                      the build's settings (written first; a resumed build must match)
    videos/{id}/starts.npy          int64 [W]: the first frame of each cached window, ascending
    videos/{id}/z.npy               [W, e, L]   latent of the frames x             (the target)
    videos/{id}/z_l.npy             [W, e, L]   latent of the landmark clip x_l    (condition)
    videos/{id}/masked_z.npy        [W, e, L]   latent of the masked frames        (condition)
    videos/{id}/ref.npy             [W, e, r*r] xy-plane of the reference clip's latent x_ref
    videos/{id}/video.json          {"id", "frames", "windows"}
    manifest.json                   settings + per-video window counts and splits (written last)

``L = r*r + 2*s*r`` (2048 at full size), ``e`` = 4. A video's files are written into
``videos/{id}.tmp-*`` and the folder is renamed into place once complete, so a killed build never
leaves a half-written video; the manifest exists only once every video is in. Arrays are plain
``.npy`` files read memory-mapped (``np.load(mmap_mode="r")``); ``dtype`` ``fp32``/``fp16`` store
float32/float16, ``bf16`` stores the bfloat16 bits as uint16 (NumPy has no bfloat16).

Windows: every ``stride``-th start ``0, S, 2S, ... <= frames - T`` of each training video (stride 1:
every window the frame-based trainer can draw), plus, for held-out videos, the evenly spaced
evaluation windows of the validation loss (``data.val_clips_per_video``).

The settings record the autoencoders' identity (checkpoint size and sha256, or the sha256 of a random
autoencoder's state_dict) and every data setting the latents depend on; :func:`check_settings` refuses
a cache whose settings differ from a training run's, naming the first difference in one line. A
``manifest.json`` or ``video.json`` that cannot be read or is damaged (:func:`manifest_problem`,
:func:`video_problem`), or arrays whose dtype or shape differ from the manifest's, are one line naming
the file and the fix (rerunning the build, which repairs them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from moditalker.errors import UserError
from moditalker.fileio import atomic_write_text, file_sha256, folder_problem, folder_records, is_count
from MToV.dataset import DEFAULT_FRAMES_DIR, DEFAULT_KEYPOINTS_DIR, window_start

FORMAT = 1
KINDS = ("z", "z_l", "masked_z", "ref")
DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
MANIFEST = "manifest.json"
BUILD = "build.json"
# informational entries of the settings: where things were, not what they were
INFORMATIONAL = {"path", "root", "split_file"}


# ----------------------------------------------------------------------------- identities and settings
def checkpoint_identity(path: str | Path) -> dict:
    """A checkpoint file's identity: its size and sha256 (and, for information, where it was)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"autoencoder checkpoint not found: {path} (needed to check the latent cache)")
    return {
        "kind": "file",
        "path": str(path.resolve()),
        "size": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def module_identity(module: nn.Module) -> dict:
    """A random (unloaded) autoencoder's identity: the sha256 of its state_dict's names and values."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return {"kind": "state_dict", "sha256": h.hexdigest()}


def split_file_hash(path: str | Path | None) -> str | None:
    if not path:
        return None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path} (set data.split_file, or null to use every id)")
    return file_sha256(path)


def data_settings(data_cfg: Mapping, timesteps: int, resolution: int) -> dict:
    """The data settings the cached latents depend on (from a trainer config's ``data`` section)."""
    get = data_cfg.get
    split_file = get("split_file", None)
    return {
        "root": str(get("root", None)),  # informational: the same frames may live elsewhere
        "frames_dir": get("frames_dir", DEFAULT_FRAMES_DIR),
        "keypoints_dir": get("keypoints_dir", DEFAULT_KEYPOINTS_DIR),
        "split_file": str(split_file) if split_file else None,
        "split_file_sha256": split_file_hash(split_file),
        "split_mode": get("split_mode", "heldout"),
        "short_videos": get("short_videos", "skip"),
        "landmark_radius": int(get("landmark_radius", 3)),
        "val_clips_per_video": int(get("val_clips_per_video", 1)),
        "timesteps": int(timesteps),
        "resolution": int(resolution),
    }


def _differences(cache: object, run: object, prefix: str = "") -> list[str]:
    if isinstance(cache, Mapping) and isinstance(run, Mapping):
        out = []
        for key in sorted(set(cache) | set(run)):
            if key in INFORMATIONAL:
                continue
            out += _differences(cache.get(key), run.get(key), f"{prefix}{key}.")
        return out
    return [] if cache == run else [f"{prefix[:-1]}: {_short(cache)} (cache) vs {_short(run)} (this run)"]


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:17] + "..." + text[-17:]


def check_settings(cache_dir: Path, cached: Mapping, expected: Mapping) -> None:
    """Refuse a cache whose ``autoencoders``/``models``/``data`` settings differ from ``expected``."""
    keys = ("autoencoders", "models", "data")
    diffs = _differences({k: cached.get(k) for k in keys}, {k: expected.get(k) for k in keys})
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise UserError(
            f"latent cache {cache_dir} was built with other settings: {diffs[0]}{more}; rebuild it "
            "(scripts/cache_mtov_latents.sh) or train with the settings it was built with"
        )


# ----------------------------------------------------------------------------- windows and storage
def grid_starts(n_frames: int, timesteps: int, stride: int) -> list[int]:
    """Training window starts of a video: 0, S, 2S, ... up to the last full window (0 when short)."""
    return list(range(0, max(n_frames - timesteps, 0) + 1, stride))


def val_starts(n_frames: int, timesteps: int, clips_per_video: int) -> list[int]:
    """The evaluation windows the frame-based validation loss reads (evenly spaced, fixed)."""
    return [window_start(n_frames, timesteps, c, clips_per_video, False) for c in range(clips_per_video)]


def latent_shapes(embed_dim: int, latent_length: int, n_xy: int) -> dict[str, tuple[int, int]]:
    return {
        "z": (embed_dim, latent_length),
        "z_l": (embed_dim, latent_length),
        "masked_z": (embed_dim, latent_length),
        "ref": (embed_dim, n_xy),
    }


def bytes_per_window(shapes: Mapping[str, Sequence[int]], dtype: str) -> int:
    """Bytes of one cached window (the four latents) at ``dtype``."""
    return sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(DTYPES[dtype]).itemsize


def to_storage(latent: torch.Tensor, dtype: str) -> np.ndarray:
    """float latents -> the array stored for ``dtype`` (bf16: round to nearest even, kept as uint16)."""
    if dtype == "bf16":
        return latent.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return latent.detach().float().cpu().numpy().astype(DTYPES[dtype])


def from_storage(array: np.ndarray, dtype: str) -> torch.Tensor:
    """What :func:`to_storage` stored -> float32 tensor (a copy: memory maps are read-only)."""
    if dtype == "bf16":
        return torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(array, dtype=np.float32))


#: below this median spread (over the cached windows) the diffused latent is practically constant
MIN_SPREAD = 1e-4


def spread_stats(z: np.ndarray) -> dict:
    """Of latents ``z`` [windows, ...]: the share of values beyond 0.99 (tanh saturation) and the
    median and mean over the latent's elements of their standard deviation across windows (None for
    one window: no spread to tell)."""
    z = np.asarray(z)
    z = z.reshape(len(z), -1) if len(z) else z
    std = z.std(axis=0) if len(z) > 1 else None
    return {
        "saturated": round(float((np.abs(z) > 0.99).mean()), 4) if len(z) else None,
        "spread_median": None if std is None else float(np.median(std)),
        "spread_mean": None if std is None else float(std.mean()),
    }


def latent_spread(folders: Sequence[Path], dtype: str, kind: str = "z", max_windows: int = 64) -> dict:
    """How much the cached latent ``kind`` varies: :func:`spread_stats` over up to ``max_windows``
    evenly spaced windows of each video folder, and the number of windows. An autoencoder whose tanh
    latent is saturated keeps what differs between clips in differences far below what a diffusion
    model can draw (measured on a 64-px autoencoder trained without ``loss.latent_weight``: median
    spread 8e-7)."""
    rows = []
    for folder in folders:
        a = np.load(Path(folder) / f"{kind}.npy", mmap_mode="r")
        idx = np.unique(np.linspace(0, len(a) - 1, min(len(a), max_windows)).round().astype(int))
        rows.append(from_storage(a[idx], dtype).flatten(1).numpy())
    z = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
    return {"windows": len(z), **spread_stats(z)}


# ----------------------------------------------------------------------------- the cache's JSON files
def _kind(value: object) -> str:
    """A JSON value's kind in messages: ``a list``, ``a string``, ``null``, ``int``, ..."""
    if value is None:
        return "null"
    return {list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def json_problem(path: Path, check: Callable[[dict], str | None] | None = None) -> tuple[dict, str | None]:
    """The JSON object in ``path`` and None, or ``{}`` and what is wrong with the file (``cannot be read
    (why)``, ``is damaged: what``): unreadable, not a JSON object, or ``check`` names a problem in it."""
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        return {}, f"cannot be read ({exc.strerror or exc})"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return {}, f"cannot be read ({exc})"
    if not isinstance(value, dict):
        return {}, f"is damaged: it holds {_kind(value)}, not a JSON object"
    problem = None if check is None else check(value)
    return (value, None) if problem is None else ({}, f"is damaged: {problem}")


def read_json(path: Path, check: Callable[[dict], str | None] | None = None) -> dict:
    """The JSON object in ``path`` (see :func:`json_problem`); a one-line :class:`UserError` if none."""
    value, problem = json_problem(path, check)
    if problem is not None:
        raise UserError(f"{path} {problem}")
    return value


def video_problem(meta: dict) -> str | None:
    """What is wrong with a ``video.json`` (None: its counts and file records are usable)."""
    for key in ("frames", "windows"):
        if not is_count(meta.get(key)):
            return f"its {key} is {_short(meta.get(key))}, not a count"
    files = meta.get("files", {})
    if not isinstance(files, dict) or ("files" in meta and not files):
        return f"its files are {_short(files)}, not a record of files"
    for name, record in files.items():
        pair = isinstance(record, list) and len(record) == 2
        if not (pair and is_count(record[0]) and isinstance(record[1], str)):
            return f"its record of {name} is {_short(record)}, not [size, sha256]"
    if files and (unrecorded := [f"{k}.npy" for k in (*KINDS, "starts") if f"{k}.npy" not in files]):
        return f"its files do not record {unrecorded[0]}"
    return None


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a ``manifest.json`` of this format (None: what training reads is usable)."""
    if manifest.get("dtype") not in DTYPES:
        return f"its dtype is {_short(manifest.get('dtype'))}, not one of {', '.join(DTYPES)}"
    if not is_count(manifest.get("stride"), 1):
        return f"its stride is {_short(manifest.get('stride'))}, not a count >= 1"
    data = manifest.get("data")
    if not isinstance(data, dict) or not is_count(data.get("timesteps"), 1):
        return "its data.timesteps is not a count >= 1"
    shapes = manifest.get("shapes")
    for k in KINDS:
        shape = shapes.get(k) if isinstance(shapes, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_count(n, 1) for n in shape)):
            return f"its shapes.{k} is {_short(shape)}, not [channels, length]"
    videos = manifest.get("videos")
    if not isinstance(videos, dict):
        return f"its videos are {_short(videos)}, not a record of videos"
    for vid, video in videos.items():
        if not (isinstance(video, dict) and is_count(video.get("frames")) and is_count(video.get("windows"))):
            return f"its record of video {vid} is {_short(video)}, not {{frames, windows}}"
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return f"its splits are {_short(splits)}, not {{train, test}}"
    for split in ("train", "test"):
        ids = splits.get(split)
        if not isinstance(ids, list):
            return f"its splits.{split} is {_short(ids)}, not a list of ids"
        if absent := [i for i in ids if not isinstance(i, str) or i not in videos]:
            return f"its splits.{split} lists {_short(absent[0])}, which is not among its videos"
    return None


def check_built(
    folder: Path, windows: int, shapes: dict, dtype: str, frames: int | None = None
) -> str | None:
    """What is wrong with a built video's folder (None: its files are as ``video.json`` records them;
    a video of an older build without records: its arrays' shapes and sizes are right, and they are
    recorded now). ``windows``/``frames``: what this build expects of the video."""
    meta, problem = json_problem(folder / "video.json", video_problem)
    if problem is not None:
        return f"its video.json {problem}"
    if meta["windows"] != windows or (frames is not None and meta["frames"] != frames):
        return (
            f"its video.json records {meta['frames']} frames and {meta['windows']} windows, "
            f"expected {frames if frames is not None else meta['frames']} and {windows}"
        )
    if "files" in meta:
        return folder_problem(folder, meta["files"])
    for k in (*KINDS, "starts"):
        want = (windows,) if k == "starts" else (windows, *shapes[k])
        try:
            a = np.load(folder / f"{k}.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            return f"{k}.npy cannot be read ({type(exc).__name__})"
        if a.shape != want or (k != "starts" and a.dtype != np.dtype(DTYPES[dtype])):
            return f"{k}.npy has shape {a.shape}, expected {want}"
    meta["files"] = folder_records(folder, skip=("video.json",))
    atomic_write_text(folder / "video.json", json.dumps(meta) + "\n")
    return None


# ----------------------------------------------------------------------------- reading a cache
class LatentCache:
    """A complete cache folder: its manifest, and each video's arrays memory-mapped on first use."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            if (self.root / BUILD).is_file():
                done = sum(1 for p in (self.root / "videos").glob("*/video.json"))
                raise UserError(
                    f"latent cache {self.root} is incomplete ({done} videos built, no {MANIFEST}); "
                    "rerun scripts/cache_mtov_latents.sh with the same settings to finish it"
                )
            raise UserError(
                f"no latent cache at {self.root} (expected {manifest}); build it with "
                "scripts/cache_mtov_latents.sh"
            )
        self.manifest, problem = json_problem(manifest)
        if problem is None and self.manifest.get("format") != FORMAT:
            raise UserError(
                f"latent cache {self.root} has format {self.manifest.get('format')}, expected "
                f"{FORMAT}; rebuild it"
            )
        if problem is None and (damage := manifest_problem(self.manifest)) is not None:
            problem = f"is damaged: {damage}"
        if problem is not None:
            raise UserError(
                f"{manifest} {problem}; rerun scripts/cache_mtov_latents.sh (python -m MToV.cache_latents) "
                f"with the same settings and --out {self.root} to write it again"
            )
        self.dtype = self.manifest["dtype"]
        self.stride = self.manifest["stride"]
        self.timesteps = self.manifest["data"]["timesteps"]
        self.shapes = {k: tuple(self.manifest["shapes"][k]) for k in KINDS}
        self.videos: dict[str, dict] = self.manifest["videos"]
        self._maps: dict[str, dict[str, np.ndarray]] = {}

    def split(self, name: str) -> list[str]:
        """The ids of split ``train`` or ``test`` (in the frame-based dataset's order)."""
        return list(self.manifest["splits"][name])

    def arrays(self, vid: str) -> dict[str, np.ndarray]:
        if vid not in self._maps:
            folder = self.root / "videos" / vid
            try:
                records = read_json(folder / "video.json", video_problem).get("files", {})
                for name, (size, _sha) in records.items():  # the sizes (cheap; the build checks hashes)
                    if (actual := (folder / name).stat().st_size) != size:
                        raise ValueError(f"{name} has {actual} bytes, {size} recorded")
                maps = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in (*KINDS, "starts")}
                if (problem := self._arrays_problem(maps)) is not None:
                    raise ValueError(problem)
            except (OSError, ValueError, UserError) as exc:
                raise UserError(
                    f"cannot read the cached latents of {vid} in {folder}: {exc}; rerun "
                    "scripts/cache_mtov_latents.sh with the same settings to build it again"
                ) from exc
            maps["starts"] = np.asarray(maps["starts"])
            self._maps[vid] = maps
        return self._maps[vid]

    def _arrays_problem(self, maps: dict[str, np.ndarray]) -> str | None:
        """What is wrong with a video's arrays against the manifest (dtype, shapes; None: nothing)."""
        starts = maps["starts"]
        if starts.ndim != 1 or starts.dtype.kind not in "iu":
            return f"starts.npy holds {starts.dtype} {list(starts.shape)}, expected a list of frame numbers"
        want = np.dtype(DTYPES[self.dtype])
        for k in KINDS:
            a, shape = maps[k], (len(starts), *self.shapes[k])
            if a.dtype != want or a.shape != shape:
                return (
                    f"{k}.npy holds {a.dtype} {list(a.shape)}, the manifest says {want} ({self.dtype}) "
                    f"{list(shape)}"
                )
        return None

    def window(self, vid: str, start: int) -> dict[str, torch.Tensor]:
        """The four float32 latents of the window of ``vid`` starting at frame ``start``."""
        maps = self.arrays(vid)
        i = int(np.searchsorted(maps["starts"], start))
        if i >= len(maps["starts"]) or maps["starts"][i] != start:
            raise UserError(
                f"window start {start} of {vid} is not in the latent cache {self.root} (stride {self.stride})"
            )
        return {k: from_storage(maps[k][i], self.dtype) for k in KINDS}

    def __getstate__(self) -> dict:  # DataLoader workers open their own memory maps
        return {**self.__dict__, "_maps": {}}


class CachedWindowDataset(Dataset):
    """Windows of the cached videos of one split, drawn as :class:`MToV.dataset.HDTFClipDataset` draws
    them: ``clips_per_video`` items per video; training windows uniform over the cached starts (at
    stride 1 the very same draw from torch's generator as the frame-based dataset, hence the same
    windows under the same seed), evaluation windows the fixed evenly spaced ones.

    Items: ``z``, ``z_l``, ``masked_z``, ``ref`` (float32 tensors), ``id``, ``start``.
    """

    def __init__(self, cache: LatentCache, split: str, clips_per_video: int = 1) -> None:
        self.cache, self.split = cache, split
        self.random_window = split == "train"
        self.clips_per_video = int(clips_per_video)
        self.ids = cache.split(split)
        if not self.ids:
            raise UserError(f"the latent cache {cache.root} holds no {split} video")

    def __len__(self) -> int:
        return len(self.ids) * self.clips_per_video

    def name(self, index: int) -> str:
        return f"{self.cache.root}/videos/{self.ids[index // self.clips_per_video]}"

    def start(self, vid: str, clip: int) -> int:
        n, t, stride = int(self.cache.videos[vid]["frames"]), self.cache.timesteps, self.cache.stride
        if self.random_window and stride > 1:
            return stride * int(torch.randint(0, len(grid_starts(n, t, stride)), ()).item())
        return window_start(n, t, clip, self.clips_per_video, self.random_window)

    def __getitem__(self, index: int) -> dict:
        vid = self.ids[index // self.clips_per_video]
        start = self.start(vid, index % self.clips_per_video)
        return {**self.cache.window(vid, start), "id": vid, "start": start}


class CachedLatents:
    """The cache path's counterpart of the trainer's ``LatentBatcher``: a batch of cached latents ->
    ``(z, cond, image_cond)`` as the UNet takes them (``cond`` = landmark latent | masked latent)."""

    keys = KINDS

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch["z"], torch.cat([batch["z_l"], batch["masked_z"]], dim=1), batch["ref"]


def run_settings(cfg, ae_rgb: nn.Module, ae_ldmk: nn.Module) -> dict:
    """What a cache for trainer config ``cfg`` holds: the autoencoders' identities (checkpoint files,
    or the given random modules when ``cfg.random_autoencoders``), their sizes, the data settings."""
    from omegaconf import OmegaConf

    from moditalker.fileio import repo_path

    if cfg.random_autoencoders:
        ids = {"rgb": module_identity(ae_rgb), "ldmk": module_identity(ae_ldmk)}
    else:
        ids = {k: checkpoint_identity(repo_path(cfg.checkpoints[f"ae_{k}"])) for k in ("rgb", "ldmk")}
    ldmk = cfg.get("autoencoder_ldmk")
    return {
        "format": FORMAT,
        "autoencoders": ids,
        "models": {
            "autoencoder": OmegaConf.to_container(cfg.autoencoder, resolve=True),
            "autoencoder_ldmk": None if ldmk is None else OmegaConf.to_container(ldmk, resolve=True),
        },
        "data": data_settings(cfg.data, ae_rgb.timesteps, ae_rgb.res),
    }


def open_cache(cfg, ae_rgb: nn.Module, ae_ldmk: nn.Module) -> LatentCache:
    """The cache ``cfg.data.latents`` for a training run of ``cfg``, refused (one line) when it was built
    from other autoencoders or data settings."""
    cache = LatentCache(cfg.data.latents)
    check_settings(cache.root, cache.manifest, run_settings(cfg, ae_rgb, ae_ldmk))
    return cache
