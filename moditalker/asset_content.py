"""What an asset file holds, not only that it exists: the content checks of ``python -m moditalker.assets
check`` and of the downloads.

Cheap checks (the default; well under a second per file, whatever its size):

* every weights file: not empty, not a web page (Google Drive's "cannot scan for viruses" or quota page
  saved in place of the file), a torch archive whose zip directory is complete (a truncated download
  loses it) or a legacy torch pickle;
* the MoDiTalker checkpoints (``atom``, ``autoencoder_rgb``, ``autoencoder_motion``, ``diffusion_model``):
  the archive is opened memory-mapped (no tensor is read) and its state_dict(s) must hold exactly the
  keys and shapes of the official checkpoints (``official_layouts.json``, taken from the reference
  manifests of KU-CVLAB/MoDiTalker @ 609fe25); ``deep3d`` must fit the ResNet-50 regressor it is
  loaded into;
* ``.mat`` files: the variables the loaders read are listed with their shapes (``scipy.io.whosmat``, no
  data read): ``meanshape``, ``idBase``, ``exBase``, ``keypoints`` (68) in ``BFM_model_front.mat``,
  ``lm`` [68, 3] in ``similarity_Lm3D_all.mat``;
* the HuBERT folder: ``config.json`` and ``preprocessor_config.json`` parse, the weights file is a
  complete safetensors file (its header's byte ranges end at the file's end) or torch archive.

Deep checks (``--deep``; they read every byte, seconds per file, and the model loads take memory):

* every zip-format archive: the CRC-32 of every member (a file damaged in the middle);
* every torch file is loaded in full (``weights_only=True``), legacy pickles included;
* ``.mat`` files are loaded and their arrays' shapes checked against each other;
* HuBERT loads with ``transformers`` (``HubertModel.from_pretrained``), the FAN and s3fd weights load
  strictly into face-alignment's networks.

Each check returns a list of problems, one line each (empty: fine).
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from moditalker.errors import describe

LAYOUTS_FILE = Path(__file__).with_name("official_layouts.json")
DEEP3D_LAYOUT_FILE = Path(__file__).with_name("deep3d_layout.json")

#: which official layout each MoDiTalker checkpoint has, and the wrapper keys its loader accepts
LAYOUT_OF = {
    "atom": "atom",
    "autoencoder_rgb": "autoencoder",
    "autoencoder_motion": "autoencoder",
    "diffusion_model": "unet",
}
#: the assets that are one torch weights file
TORCH_FILES = (
    "atom",
    "autoencoder_rgb",
    "autoencoder_motion",
    "diffusion_model",
    "deep3d",
    "lpips_vgg16",
    "lpips_alexnet",
    "fid_inception",
    "i3d_400",
    "syncnet",
    "arcface",
)
#: variables (and, where fixed, their shapes) the loaders read from each .mat asset
MAT_FIELDS = {
    "bfm_front": ("meanshape", "idBase", "exBase", "keypoints"),
    "bfm_similarity": ("lm",),
}
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@cache
def official_layouts() -> dict[str, dict[str, tuple[int, ...]]]:
    """``{"atom" | "autoencoder" | "unet": {key: shape}}`` of the official checkpoints."""
    raw = json.loads(LAYOUTS_FILE.read_text())
    return {name: {k: tuple(v) for k, v in layout.items()} for name, layout in raw.items() if name[0] != "_"}


def sniff(path: Path) -> tuple[str, str]:
    """``(kind, problem)`` of a weights file from its bytes: kind is ``zip``, ``legacy`` or ``""``;
    problem is "" when the file may be fine, else what it is instead (one phrase)."""
    size = path.stat().st_size
    if size == 0:
        return "", "an empty file (an interrupted download or copy?)"
    with open(path, "rb") as f:
        head = f.read(1024)
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<body", b"<meta", b"<script")):
        return "", (
            "a web page (HTML), not the file: Google Drive saves its 'cannot scan for viruses' or "
            "'too many users' page instead of a large file"
        )
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            return "zip", (
                f"a truncated or damaged archive ({size:,} bytes; its zip directory is missing or "
                f"broken: {describe(exc)}): an interrupted download?"
            )
        return "zip", ""
    if head.startswith(_LEGACY_MAGIC):
        return "legacy", ""
    return "", f"not a torch checkpoint (its first bytes are {head[:8]!r})"


def _zip_crc(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"damaged: {describe(exc)}"
    return f"damaged: member {bad} fails its CRC check" if bad else ""


def _load(path: Path, kind: str, deep: bool) -> tuple[object, str]:
    """``torch.load`` (memory-mapped for zip archives unless ``deep``); ``(obj, problem)``."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip" and not deep), ""
    except Exception as exc:  # noqa: BLE001 - any failure means a bad or foreign file
        text = describe(exc)
        if "weights_only" in text or "Weights only load failed" in text:
            text = "it holds more than plain tensors (not a checkpoint of this kind, or damaged)"
        return None, f"not a readable torch archive: {text[:200]}"


def _strip(state: Mapping) -> dict:
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def layout_mismatch(layout: Mapping[str, tuple[int, ...]], state: Mapping) -> str:
    """How ``state`` differs from ``layout`` in keys and shapes ("" when it matches)."""
    from moditalker.checkpoint import mismatch

    return mismatch(layout, state, versus=", official ")


def _state_dicts(name: str, obj: object) -> tuple[dict[str, dict], str]:
    """The state_dict(s) of a MoDiTalker checkpoint as its loader reads them:
    ``({label: state}, problem)``."""
    if not isinstance(obj, Mapping):
        return {}, f"holds a {type(obj).__name__}, not a state_dict"
    if name == "atom":
        if not isinstance(obj.get("model_state_dict"), Mapping):
            return {}, f"is not an AToM checkpoint (no 'model_state_dict'; keys {sorted(map(str, obj))[:5]})"
        keys = [k for k in ("model_state_dict", "ema_state_dict") if isinstance(obj.get(k), Mapping)]
        return {k: _strip(obj[k]) for k in keys}, ""
    wrappers = ("ema", "model", "state_dict") if name == "diffusion_model" else ("model", "state_dict")
    for key in wrappers:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = _strip(obj)
    if name == "diffusion_model" and state and not any(k.startswith("diffusion_model.") for k in state):
        state = {f"diffusion_model.{k}": v for k, v in state.items()}
    return {"state_dict": state}, "" if state else "holds an empty state_dict"


def check_torch_file(name: str, path: Path, deep: bool = False) -> list[str]:
    """Problems of one torch weights file (see the module docstring)."""
    kind, problem = sniff(path)
    if problem:
        return [f"{path} is {problem}"]
    if deep and kind == "zip":
        problem = _zip_crc(path)
        if problem:
            return [f"{path} is {problem} (download it again)"]
    if kind == "legacy" and not deep and name not in LAYOUT_OF:
        return []  # legacy pickles cannot be memory-mapped: loading them in full is a --deep check
    obj, problem = _load(path, kind, deep)
    if problem:
        return [f"{path} is {problem}"]
    if name == "deep3d":
        return _deep3d_problems(obj, path)
    if name not in LAYOUT_OF:
        return []
    states, problem = _state_dicts(name, obj)
    if problem:
        return [f"{path} {problem}"]
    layout = official_layouts()[LAYOUT_OF[name]]
    out = []
    for label, state in states.items():
        diff = layout_mismatch(layout, state)
        if diff:
            where = f" ({label})" if name == "atom" else ""
            out.append(f"{path}{where} does not match the official {name} layout: {diff}")
    return out


def deep3d_state_dict(obj: object, path: Path) -> dict:
    """The regressor's ``state_dict`` in a Deep3DFaceRecon checkpoint (``{'net_recon': state_dict}`` or the
    bare dict), its ``module.`` / ``net_recon.`` key prefixes taken off; a ``UserError`` naming ``path``
    when it holds no such dict."""
    import torch

    from moditalker.errors import UserError

    if isinstance(obj, dict) and "net_recon" in obj and isinstance(obj["net_recon"], dict):
        obj = obj["net_recon"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path} is not a Deep3DFaceRecon checkpoint (expected {{'net_recon': state_dict}})")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "net_recon."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


@cache
def deep3d_layout() -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the ResNet-50 regressor ``data.recon3d`` loads ``epoch_20.pth`` into."""
    raw = json.loads(DEEP3D_LAYOUT_FILE.read_text())
    return {k: tuple(v) for k, v in raw["deep3d"].items()}


def _deep3d_problems(obj: object, path: Path) -> list[str]:
    """The Deep3DFaceRecon checkpoint must fit the ResNet-50 regressor data.recon3d loads it into."""
    from moditalker.errors import UserError

    try:
        state = deep3d_state_dict(obj, path)
    except UserError as exc:
        return [str(exc)]
    skip = "num_batches_tracked"  # old checkpoints lack the BatchNorm step counters (the loader adds them)
    diff = layout_mismatch(deep3d_layout(), {k: v for k, v in state.items() if not k.endswith(skip)})
    return [f"{path} does not fit the Deep3DFaceRecon ResNet-50 (257 coefficients): {diff}"] if diff else []


def check_mat_file(name: str, path: Path, deep: bool = False) -> list[str]:
    """Problems of a BFM ``.mat`` asset: readable, and holding the variables the loaders use."""
    import scipy.io as sio

    if path.stat().st_size == 0:
        return [f"{path} is an empty file (an interrupted download or copy?)"]
    kind, problem = sniff(path)
    if problem.startswith("a web page"):
        return [f"{path} is {problem}"]
    try:
        shapes = {n: tuple(s) for n, s, _ in sio.whosmat(str(path))}
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for foreign files
        return [f"{path} is not a readable MATLAB .mat file: {describe(exc)}"]
    missing = [k for k in MAT_FIELDS[name] if k not in shapes]
    if missing:
        return [f"{path} lacks the variables {missing} the loaders read (has {sorted(shapes)[:8]})"]
    if name == "bfm_similarity" and shapes["lm"] != (68, 3):
        return [f"{path}: 'lm' is {shapes['lm']}, expected (68, 3)"]
    if name == "bfm_front" and 68 not in shapes["keypoints"]:
        return [f"{path}: 'keypoints' is {shapes['keypoints']}, expected 68 indices"]
    if not deep:
        return []
    try:
        mat = sio.loadmat(str(path))
    except Exception as exc:  # noqa: BLE001
        return [f"{path} is a damaged .mat file (truncated?): {describe(exc)}"]
    if name == "bfm_front":
        n3 = mat["meanshape"].size
        for key in ("idBase", "exBase"):
            if mat[key].shape[0] != n3:
                return [f"{path}: {key} has {mat[key].shape[0]} rows, meanshape {n3} values"]
    return []


def _safetensors_problem(path: Path) -> str:
    """Why ``path`` is not a complete safetensors file ("" when its header covers the file exactly)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "a truncated safetensors file (no header)"
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8 or n > 100_000_000:
            return "not a safetensors file, or a truncated one (its header length exceeds the file)"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "not a safetensors file (its header is not JSON)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"a truncated safetensors file ({size:,} of {expected:,} bytes): an interrupted download?"
    return ""


def check_hubert(path: Path, deep: bool = False) -> list[str]:
    """Problems of a HuBERT ``transformers`` folder."""
    out = []
    for fname in ("config.json", "preprocessor_config.json"):
        try:
            json.loads((path / fname).read_text())
        except (OSError, ValueError) as exc:
            out.append(f"{path / fname} is not readable JSON: {describe(exc)}")
    weights = path / "model.safetensors"
    if weights.is_file():
        if weights.stat().st_size == 0 or sniff(weights)[1].startswith("a web page"):
            out.append(f"{weights} is {sniff(weights)[1]}")
        else:
            problem = _safetensors_problem(weights)
            if problem:
                out.append(f"{weights} is {problem}")
    else:
        out += check_torch_file("hubert", path / "pytorch_model.bin", deep)
    if out or not deep:
        return out
    try:
        from transformers import HubertModel

        HubertModel.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        return [f"{path} does not load as a HuBERT model: {describe(exc)}"]
    return []


def check_face_alignment(folder: Path, files: tuple[str, ...], deep: bool = False) -> list[str]:
    """Problems of the FAN / s3fd weights in ``folder``."""
    out = []
    for fname in files:
        out += check_torch_file("face_alignment", folder / fname, deep)
    if out or not deep:
        return out
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    from moditalker.checkpoint import mismatch, unwrap_state_dict

    for net, fname in ((FAN(4), files[0]), (s3fd(), files[1])):
        path = folder / fname
        obj, problem = _load(path, sniff(path)[0], True)
        try:
            diff = problem or mismatch(net.state_dict(), unwrap_state_dict(obj, path))
        except Exception as exc:  # noqa: BLE001
            diff = describe(exc)
        if diff:
            out.append(f"{path} does not load into face-alignment's network: {diff}")
    return out
