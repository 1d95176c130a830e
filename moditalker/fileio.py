"""Paths and files: the repository root, atomic writes (temp file in the same folder, then rename),
the no-overwrite rule, checked ``.npy`` reading, and the size + sha256 records that cache entries keep
of their files (:func:`file_sha256`, :func:`file_record`, :func:`folder_records`,
:func:`record_problem`): a cache entry is checked against them before it is trusted; the JSON records
themselves are read with :func:`json_or_none` and their counts checked with :func:`is_count`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from moditalker.errors import DiskFullError, UserError, bytes_in, describe, is_disk_full

#: The repository (source checkout) root: configs/ and checkpoints/ defaults are relative to it.
REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str | Path) -> Path:
    """``path`` as given when it is absolute or exists from the working folder, else relative to the
    repository root (so ``configs/mtov_tiny.yaml`` works from any folder); ``~`` is expanded."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temp name keeps ``path``'s suffix (or ``suffix``) so writers that infer a format from the
    extension (PyAV, PIL, np.save) behave. A full disk while writing is a :class:`DiskFullError`
    naming ``path`` (nothing is left at ``path`` or beside it).
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a normal write follows the umask
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(path, at_least=bytes_in(tmp_path)) from exc
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path when it is a file; else one UserError: ``<what> not found: <path>`` or, for a
    folder, ``<what> <path> is a folder, not a file``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file: equal resolved paths, or one inode (hard links)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` atomically (no half-written ``.npy`` after a crash)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array))


def torch_save(obj: object, path: str | Path) -> None:
    """``torch.save`` atomically (checkpoints survive a crash mid-write)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # Python's file: a full disk is an OSError
        torch.save(obj, f)


def check_output(path: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse to overwrite an existing output unless ``overwrite``; check the folder is writable.

    An output that is one of ``inputs`` (same resolved path or a hard link to it) is refused whatever
    ``overwrite`` says: an input is never an output.
    """
    path = Path(path)
    for given in inputs:
        if given is not None and same_file(path, given):
            raise UserError(f"output {path} is the input {given}; choose another output name")
    if path.is_dir():  # even with overwrite: a file cannot replace a folder
        raise UserError(f"output {path} is a folder; remove it or choose another output name")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it")
    writable_folder(path.parent if str(path.parent) else Path("."), f"cannot write {path}")
    return path


def remove_path(path: str | Path) -> None:
    """Remove ``path`` whatever it is (a folder with its contents, a file, a link); nothing if absent."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def writable_folder(folder: str | Path, what: str = "cannot write there") -> Path:
    """Check that ``folder`` exists and is writable, or could be created (its nearest existing
    ancestor is a writable folder), without creating anything: a run refused later for a bad input
    leaves the file system as it found it. The writers create the folders when they write."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}: folder {existing} is not writable")
    return folder


def load_npy(path: str | Path, what: str = "array") -> np.ndarray:
    """``np.load`` with a clear error for a missing or unreadable file."""
    path = require_file(path, f"{what} file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        kind = "an empty file" if not magic else "a .npz archive" if magic.startswith(b"PK") else "not one"
        raise UserError(f"{what}: {path} must be a NumPy .npy file (np.save), but it is {kind}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {what} from {path}: {describe(exc)}") from exc


# ----------------------------------------------------------------------------- size + hash records
_SHA256: dict[tuple[str, int, int, int, int], str] = {}


def json_or_none(path: str | Path) -> object:
    """The JSON value in ``path``; None when it cannot be read (missing, a folder, not JSON, not UTF-8)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None


def is_count(value: object, low: int = 0) -> bool:
    """Whether ``value`` (read from a JSON record) is an integer >= ``low``, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, memoised per process by resolved path, inode, size, mtime and ctime
    (any write to the file, even one that restores the mtime, changes the ctime)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA256[memo] = h.hexdigest()
    return _SHA256[memo]


def file_record(path: str | Path) -> list:
    """``[size, sha256]`` of a file, as cache entries record their files when they are committed."""
    return [Path(path).stat().st_size, file_sha256(path)]


def folder_records(folder: str | Path, skip: Iterable[str] = (".done",)) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file under ``folder`` (names in ``skip`` left out)."""
    folder, skip = Path(folder), set(skip)
    return {
        p.relative_to(folder).as_posix(): file_record(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def path_records(root: str | Path, paths: Iterable[str | Path]) -> dict[str, list]:
    """``{path relative to root: [size, sha256]}`` of the files in ``paths`` (a folder: all under it)."""
    root, files = Path(root), []
    for path in map(Path, paths):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.relative_to(root).as_posix(): file_record(p) for p in files}


def record_problem(path: str | Path, record: Iterable) -> str | None:
    """What is wrong with ``path`` against its ``[size, sha256]`` record (None: it is as recorded)."""
    path = Path(path)
    try:
        size, digest = record
        size = int(size)
    except (TypeError, ValueError):
        return f"the record of {path.name} is damaged"
    if not path.is_file():
        return f"{path.name} is missing"
    actual = path.stat().st_size
    if actual != size:
        kind = "truncated" if actual < size else "longer than recorded"
        return f"{path.name} is {kind} ({actual} bytes, {size} recorded)"
    if file_sha256(path) != digest:
        return f"{path.name} has changed (its sha256 is not the recorded one)"
    return None


def folder_problem(folder: str | Path, records: dict) -> str | None:
    """The first file under ``folder`` that is not as ``records`` (:func:`folder_records`) say."""
    if not isinstance(records, dict):
        return "its record of files is damaged"
    for name, record in sorted(records.items()):
        problem = record_problem(Path(folder) / name, record)
        if problem is not None:
            return problem.replace(Path(name).name, name, 1) if "/" in name else problem
    return None


def npz_problem(path: str | Path, npy: bool = False) -> str | None:
    """What is wrong with an ``.npz`` that has no size + hash record: None when every array in it
    reads back whole (the zip checks each member's CRC), else a short description. ``npy``: a ``.npy``
    whose header and size agree (memory-mapped: nothing is read)."""
    path = Path(path)
    try:
        if npy:
            np.load(path, mmap_mode="r", allow_pickle=False)
            return None
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                z[name]
    except Exception as exc:  # noqa: BLE001 - any failure to read it back means: make it again
        return f"{path.name} cannot be read ({type(exc).__name__})"
    return None
