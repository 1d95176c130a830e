"""The one way checkpoints are read and loaded: ``torch.load(weights_only=True)`` on the CPU, and a
strict ``load_state_dict`` whose mismatch is reported in one format for every network:

    ``<what> <path> does not match the configured model (<sizes>): 3 missing (e.g. k); 1 unexpected
    (e.g. k); 2 with other shapes (e.g. k: (4, 8) vs (8, 8)); <fix>``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from moditalker.errors import UserError, describe

CHECK_HINT = "see `python -m moditalker.assets check`"


def read_checkpoint(path: str | Path, what: str, hint: str = CHECK_HINT) -> object:
    """``torch.load`` a checkpoint on the CPU (weights only: no code runs); a missing or unreadable
    file is one :class:`UserError` line naming ``what`` and the path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} checkpoint {path} is a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise UserError(f"{what} checkpoint not found: {path}; {hint}")
    problem = _not_a_checkpoint(path)
    if problem:
        raise UserError(f"cannot read {what} checkpoint {path}: {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad or foreign file
        raise UserError(f"cannot read {what} checkpoint {path}: {_load_error(exc)}") from exc


def _not_a_checkpoint(path: Path) -> str:
    """Why ``path`` cannot be a torch checkpoint, judged from its first bytes ("" when it may be one)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty (an interrupted download or copy?); download it again"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return (
            "it is a web page, not a checkpoint (a Google Drive download often saves the 'cannot scan "
            "for viruses' page instead of the file); download it again, confirming the warning page"
        )
    return ""


def _load_error(exc: BaseException) -> str:
    """torch.load's failure in one line, without its advice to retry with ``weights_only=False``
    (wrong for a damaged file, and unsafe for a foreign one)."""
    text = describe(exc)
    if "weights_only" in text or "Weights only load failed" in text:
        return "not a checkpoint of plain tensors, or a damaged file; download it again"
    if isinstance(exc, (EOFError, RuntimeError)) and ("zip" in text.lower() or "EOF" in type(exc).__name__):
        return "the file is truncated or damaged (an interrupted download?); download it again"
    return text[:200]


def unwrap_state_dict(
    obj: object, path: str | Path, wrappers: Sequence[str] = ("model", "state_dict")
) -> dict:
    """The state_dict inside ``obj``: ``obj[key]`` for the first of ``wrappers`` that holds a mapping,
    else ``obj`` itself; a ``module.`` prefix (DDP) is dropped. Anything else is a UserError."""
    if isinstance(obj, Mapping):
        for key in wrappers:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{path} does not hold a state_dict")
    _refuse_non_tensors(obj, str(path))
    return strip_module_prefix(dict(obj))


def _refuse_non_tensors(state: Mapping, where: str) -> None:
    """A one-line UserError when ``state`` is not ``{name: tensor}`` (:func:`not_tensors`)."""
    problem = not_tensors(state)
    if problem:
        raise UserError(f"{where} does not hold a state_dict of tensors: {problem}")


def not_tensors(state: Mapping) -> str:
    """What makes ``state`` other than ``{name: tensor}`` (keys that are not strings, values that are not
    tensors), in one line; "" when it is one."""
    keys = [k for k in state if not isinstance(k, str)]
    values = [k for k, v in state.items() if isinstance(k, str) and not isinstance(v, torch.Tensor)]
    parts = []
    if keys:
        parts.append(f"{len(keys)} keys are not strings (e.g. {keys[0]!r:.40}: {type(keys[0]).__name__})")
    if values:
        k = values[0]
        parts.append(f"{len(values)} values are not tensors (e.g. {k}: {type(state[k]).__name__})")
    return "; ".join(parts)


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict:
    """Drop a ``module.`` prefix (checkpoints saved from DDP); a key that is not a string stays as it is."""
    return {k.removeprefix("module.") if isinstance(k, str) else k: v for k, v in state.items()}


def _shape(value: object) -> tuple:
    """The shape of a tensor; ``()`` for anything without one."""
    shape = getattr(value, "shape", ())
    return tuple(shape) if isinstance(shape, Sequence) else ()


def mismatch(own: Mapping, state: Mapping[str, torch.Tensor], versus: str = " vs ") -> str:
    """How ``state`` differs from ``own`` (a model's state_dict, or ``{key: shape}``) in keys and shapes;
    "" when it fits. ``versus`` joins a wrong shape to the expected one in the message; a value without
    a shape (not a tensor) counts as shape ``()``."""
    want = {k: tuple(getattr(v, "shape", v)) for k, v in own.items()}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and _shape(state[k]) != want[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with other shapes (e.g. {k}: {_shape(state[k])}{versus}{want[k]})")
    return "; ".join(parts)


def load_strict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    what: str,
    sizes: str = "",
    fix: str = "pass the --config the checkpoint was trained with",
) -> nn.Module:
    """``model.load_state_dict(state, strict=True)``; a key or shape mismatch is one UserError line in
    the format of this module's docstring (``sizes`` describes the configured model), as is a ``state``
    that is not ``{name: tensor}``."""
    if not isinstance(state, Mapping):
        raise UserError(f"{what} {path} does not hold a state_dict (it holds a {type(state).__name__})")
    _refuse_non_tensors(state, f"{what} {path}")
    state = strip_module_prefix(state)
    problem = mismatch(model.state_dict(), state)
    if problem:
        about = f" ({sizes})" if sizes else ""
        raise UserError(f"{what} {path} does not match the configured model{about}: {problem}; {fix}")
    model.load_state_dict(state, strict=True)
    return model
