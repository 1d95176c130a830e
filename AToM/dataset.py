"""AToM training data: GeneFace's binarized LRS3 and a plain folder of per-clip ``.npz`` files.

Both give clips of ``hubert [2T, D]`` (50 Hz) and ``idexp_lm3d [T, 68, 3]`` (25 fps). A training item
is a random window of ``horizon`` frames (``2 * horizon`` HuBERT frames); the window's first frame is
the reference (as in the original). Clips shorter than a window are edge-padded (last landmark frame
and last HuBERT frame repeated) and carry a frame mask so the loss ignores the padding; clips shorter
than ``min_frames`` are skipped.

GeneFace layout (``IndexedDataset``): ``{split}.data`` holds pickled dicts back to back and
``{split}.idx`` is an ``np.save``-d dict ``{"offsets": [0, end_0, end_1, ...]}``. Reading it unpickles
the file: only use binaries you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moditalker.errors import UserError, describe
from moditalker.training.bad_items import READ_ERRORS, allowed_bad_items, warn_unreadable


# ---------------------------------------------------------------------- GeneFace IndexedDataset
class IndexedDataset:
    """Random access to GeneFace's ``{path}.data`` / ``{path}.idx`` (one pickled dict per item)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        idx, data = Path(f"{path}.idx"), Path(f"{path}.data")
        for f in (idx, data):
            if not f.is_file():
                raise UserError(
                    f"binarized dataset file not found: {f} (expected GeneFace {{split}}.data/.idx)"
                )
        try:
            self.offsets = np.asarray(np.load(idx, allow_pickle=True).item()["offsets"], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
            raise UserError(f"cannot read index {idx}: {exc}") from exc
        self._file = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if self._file is None:  # opened lazily so each DataLoader worker has its own handle
            self._file = open(f"{self.path}.data", "rb", buffering=0)  # noqa: SIM115
        self._file.seek(int(self.offsets[i]))
        return pickle.loads(self._file.read(int(self.offsets[i + 1] - self.offsets[i])))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        return state


def write_indexed_dataset(path: str | Path, items: list[dict]) -> None:
    """Write items in GeneFace's binarized layout (``path.data`` + ``path.idx``); used by tests."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    with open(f"{path}.data", "wb") as f:
        for item in items:
            offsets.append(offsets[-1] + f.write(pickle.dumps(item)))
    with open(f"{path}.idx", "wb") as f:
        np.save(f, {"offsets": offsets}, allow_pickle=True)


# ---------------------------------------------------------------------- clip sources
def _clip_arrays(hubert, idexp, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one clip and cut both streams to a common length T (HuBERT to 2T)."""
    hubert = np.asarray(hubert, dtype=np.float32)
    idexp = np.asarray(idexp, dtype=np.float32)
    if hubert.ndim != 2:
        raise UserError(f"{where}: hubert must be [2T, D], got shape {hubert.shape}")
    if idexp.ndim == 2 and idexp.shape[1] == 204:
        idexp = idexp.reshape(-1, 68, 3)
    if idexp.ndim != 3 or idexp.shape[1:] != (68, 3):
        raise UserError(f"{where}: idexp_lm3d must be [T, 68, 3], got shape {idexp.shape}")
    t = min(len(idexp), len(hubert) // 2)
    return hubert[: 2 * t], idexp[:t]


class ClipSource:
    """A list of clips: ``len()``, ``lengths`` (frames) and ``load(i) -> (hubert, idexp_lm3d)``."""

    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def name(self, i: int) -> str:
        """Clip ``i`` in messages (its file or item)."""
        return f"clip {i}"


class GeneFaceSource(ClipSource):
    """GeneFace binarized LRS3 split (``{root}/{split}.data``); item keys ``hubert``, ``idexp_lm3d``."""

    def __init__(self, root: str | Path, split: str):
        self.ds = IndexedDataset(Path(root) / split)
        sizes = Path(root) / f"sizes_{split}.npy"
        if sizes.is_file():  # mel-frame counts (50 Hz, = HuBERT frames): video frames = sizes // 2
            self.lengths = np.load(sizes).astype(np.int64) // 2
        else:
            self.lengths = np.array([len(self.ds[i]["idexp_lm3d"]) for i in range(len(self.ds))], np.int64)
        self.where = f"{root}/{split}.data"

    def name(self, i: int) -> str:
        return f"{self.where} item {i}"

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        item = self.ds[i]
        for key in ("hubert", "idexp_lm3d"):
            if key not in item:
                raise UserError(f"{self.where} item {i} has no {key!r} (keys: {sorted(item)})")
        return _clip_arrays(item["hubert"], item["idexp_lm3d"], f"{self.where} item {i}")


class NpzFolderSource(ClipSource):
    """A folder of ``*.npz`` clips, each with ``hubert [2T, D]`` and ``idexp_lm3d [T, 68, 3]``."""

    def __init__(self, files: list[Path], max_bad_items: float = 0.0):
        """``max_bad_items``: unreadable files (a fraction of them when < 1, else a count) that are
        skipped with a warning; more stop with one line naming the first ones."""
        self.files, self.bad_files = [], []
        lengths = []
        for f in files:
            try:
                with open(f, "rb") as fh:
                    if fh.read(2) != b"PK":
                        raise ValueError("not a .npz archive (np.savez); empty, truncated or another format")
                with np.load(f) as z:
                    if "hubert" not in z or "idexp_lm3d" not in z:
                        raise UserError(
                            f"{f} must hold 'hubert' and 'idexp_lm3d' arrays (has {list(z.keys())})"
                        )
                    length = min(z["idexp_lm3d"].shape[0], z["hubert"].shape[0] // 2)
            except READ_ERRORS as exc:
                self.bad_files.append(f"{f}: {describe(exc)}")
                if max_bad_items > 0:
                    warn_unreadable(str(f), exc)
                continue
            self.files.append(f)
            lengths.append(length)
        if len(self.bad_files) > allowed_bad_items(max_bad_items, len(files)):
            raise UserError(
                f"{len(self.bad_files)} of {len(files)} clips cannot be read (data.max_bad_items="
                f"{max_bad_items}); first: {self.bad_files[0]}"
            )
        self.lengths = np.array(lengths, dtype=np.int64)

    def name(self, i: int) -> str:
        return str(self.files[i])

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.files[i]) as z:
            return _clip_arrays(z["hubert"], z["idexp_lm3d"], str(self.files[i]))


def detect_format(root: str | Path) -> str:
    """``geneface`` if ``root/train.data`` exists, ``npz`` if ``root`` holds ``.npz`` files."""
    root = Path(root)
    if (root / "train.data").is_file():
        return "geneface"
    if any(root.glob("*.npz")) or any(root.glob("train/*.npz")):
        return "npz"
    raise UserError(
        f"no AToM training data in {root}: expected GeneFace train.data/.idx or *.npz clips "
        "(set data.root=...)"
    )


def open_sources(
    root: str | Path, fmt: str = "auto", val_every: int = 100, max_bad_items: float = 0.0
) -> tuple[ClipSource, ClipSource]:
    """Train and val clip sources. npz: ``root/{train,val}/*.npz`` if present, else every
    ``val_every``-th file (sorted) goes to val, as GeneFace's 99:1 split; one file serves both."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"training data folder not found: {root} (set data.root=...)")
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "geneface":
        train = GeneFaceSource(root, "train")
        val = GeneFaceSource(root, "val") if (root / "val.data").is_file() else train
        return train, val
    if fmt != "npz":
        raise UserError(f"unknown data.format {fmt!r}; use auto, geneface or npz")
    if (root / "train").is_dir():
        train_files = sorted((root / "train").glob("*.npz"))
        val_files = sorted((root / "val").glob("*.npz")) or train_files
    else:
        files = sorted(root.glob("*.npz"))
        val_files = files[::val_every] if len(files) > 1 else files
        train_files = [f for f in files if f not in set(val_files)] or files
    if not train_files:
        raise UserError(f"no .npz clips found in {root}")
    train = NpzFolderSource(train_files, max_bad_items)
    if not train.files:
        raise UserError(f"none of the {len(train_files)} .npz clips in {root} can be read")
    return train, NpzFolderSource(val_files, max_bad_items)


# ---------------------------------------------------------------------- windows
class WindowDataset(Dataset):
    """Random ``horizon``-frame windows of clips; each clip appears ``ceil(T / horizon)`` times per
    epoch so long clips are seen in proportion to their length.

    Item: ``x [horizon, 204]`` (idexp landmarks, flattened), ``hubert [2 * horizon, D]``,
    ``mask [horizon]`` (False on padding). ``deterministic=True`` (validation) takes fixed windows.
    """

    def __init__(
        self,
        source: ClipSource,
        horizon: int,
        min_frames: int = 8,
        deterministic: bool = False,
        seed: int = 0,
    ):
        self.source, self.horizon, self.deterministic = source, horizon, deterministic
        # the window of item i in epoch e comes from a generator seeded by (seed, epoch, i): the same
        # in every worker and after a resume, whatever else drew random numbers before
        self.seed, self.epoch = int(seed), 0
        keep = np.nonzero(source.lengths >= min_frames)[0]
        if len(keep) == 0:
            raise UserError(f"no clip has at least {min_frames} frames (data.min_frames)")
        reps = np.maximum(1, -(-source.lengths[keep] // horizon))
        self.index = np.repeat(keep, 1 if deterministic else reps)

    def __len__(self) -> int:
        return len(self.index)

    def feature_width(self) -> int:
        """Width ``D`` of the clips' HuBERT features (read from the first readable clip)."""
        for i in range(len(self.source)):
            try:
                return int(self.source.load(i)[0].shape[1])
            except READ_ERRORS:
                continue
        raise UserError("no clip of the training data can be read")

    def name(self, i: int) -> str:
        """Item ``i`` in messages: the clip it is a window of."""
        return self.source.name(int(self.index[i]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        hubert, idexp = self.source.load(int(self.index[i]))
        w, t = self.horizon, len(idexp)
        if t >= w:
            if self.deterministic:
                start = (t - w) // 2
            else:
                rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, int(i)])
                start = int(rng.integers(0, t - w + 1))
            idexp, hubert = idexp[start : start + w], hubert[2 * start : 2 * (start + w)]
            mask = np.ones(w, dtype=bool)
        else:  # short clip: edge-pad, mask the padding out of the loss
            idexp = np.concatenate([idexp, np.repeat(idexp[-1:], w - t, axis=0)])
            hubert = np.concatenate([hubert, np.repeat(hubert[-1:], 2 * w - len(hubert), axis=0)])
            mask = np.arange(w) < t
        return {
            "x": torch.from_numpy(np.ascontiguousarray(idexp.reshape(w, -1))),
            "hubert": torch.from_numpy(np.ascontiguousarray(hubert)),
            "mask": torch.from_numpy(mask),
        }
