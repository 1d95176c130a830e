"""Warm networks: each network the pipeline builds, built once per :class:`ModelCache` and reused.

The stages ask the cache for their network (HuBERT, FAN + s3fd, Deep3DFaceRecon, AToM, the MToV
autoencoders and UNet) with the very call that builds it::

    diffusion = ctx.models.load("atom", load_atom, checkpoint, config=..., device=ctx.device, ...)

The key is the network kind plus the identity of every argument of that call: checkpoint files and
folders by resolved path, sizes and mtimes (:func:`pipeline.cache.asset_identity`), model configs by
value (a YAML path like a checkpoint), the device, ``random_weights`` and the seed of a random
network. Anything that changes what the call would build changes the key; a replaced checkpoint
file (new mtime) is loaded again.

:func:`pipeline.inference.run_inference` gives each run a fresh cache unless it is passed one, so a
command-line run loads every network once, as before; the web app (:mod:`webapp.app`) keeps one
cache for the server's life, so a second request loads nothing. :attr:`ModelCache.loads` counts the
builds per kind, :attr:`ModelCache.hits` the reuses, :attr:`ModelCache.seconds` the time the builds
took; :mod:`pipeline.batch` (``--batch_file``) renders several jobs with one cache.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline.cache import asset_identity, stable_key

__all__ = ["ModelCache", "identity"]

T = TypeVar("T")


def identity(value: Any) -> Any:
    """A JSON-able stand-in for one argument of a network's build call (see the module docstring).

    Existing paths -> :func:`~pipeline.cache.asset_identity` (path, sizes, mtimes); other strings,
    numbers, booleans and None as they are; devices and dtypes as text; mappings and sequences item by
    item; a callable (an injected face detector) by its qualified name and object id, which stays
    unique while the cache holds the network that refers to it.
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str | Path):
        if str(value) in ("", "."):  # never walk the working folder
            return str(value)
        path = Path(value).expanduser()
        try:
            exists = path.exists()
        except OSError:  # a name too long to be a path, say
            exists = False
        return f"asset:{asset_identity(path)}" if exists else str(value)
    if isinstance(value, torch.device | torch.dtype):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): identity(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [identity(v) for v in value]
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"callable:{getattr(value, '__module__', '?')}.{name}@{id(value)}"
    return f"{type(value).__qualname__}:{value!r}"


class ModelCache:
    """Networks by (kind, identity of their build call's arguments).

    ``per_kind`` bounds how many networks of one kind stay in memory (least recently used dropped
    first, before the new one is built); None keeps all. The lock makes concurrent requests build a
    network once; the app runs one job at a time anyway.
    """

    def __init__(self, per_kind: int | None = None) -> None:
        if per_kind is not None and per_kind < 1:
            raise ValueError(f"per_kind must be >= 1 or None, got {per_kind}")
        self.per_kind = per_kind
        self.loads: Counter[str] = Counter()  # builds per kind
        self.hits: Counter[str] = Counter()  # reuses per kind
        self.seconds: Counter[str] = Counter()  # wall seconds spent building (loading) per kind
        self._entries: dict[str, OrderedDict[str, Any]] = {}
        self._lock = threading.RLock()

    def key(self, kind: str, build: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> str:
        """The cache key of ``build(*args, **kwargs)`` as a network of ``kind``."""
        fn = f"{getattr(build, '__module__', '?')}.{getattr(build, '__qualname__', repr(build))}"
        return stable_key({"kind": kind, "build": fn, "args": identity(args), "kwargs": identity(kwargs)})

    def load(
        self,
        kind: str,
        build: Callable[..., T],
        *args: Any,
        same_as: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> T:
        """``build(*args, **kwargs)``, or the network an earlier call with the same identity built.

        ``same_as`` gives stand-ins for the identity of some keyword arguments: e.g. the synthetic BFM
        written into each run's work folder is the same for a given seed wherever it lies."""
        key = self.key(kind, build, args, {**kwargs, **(same_as or {})})
        with self._lock:
            entries = self._entries.setdefault(kind, OrderedDict())
            if key in entries:
                entries.move_to_end(key)
                self.hits[kind] += 1
                return entries[key]
            if self.per_kind is not None:
                while len(entries) >= self.per_kind:  # free the old one before building the new one
                    entries.popitem(last=False)
            t0 = time.perf_counter()
            network = build(*args, **kwargs)
            self.seconds[kind] += time.perf_counter() - t0
            entries[key] = network
            self.loads[kind] += 1
            return network

    def kinds(self) -> dict[str, int]:
        """Kind -> how many networks of it are held now."""
        with self._lock:
            return {kind: len(entries) for kind, entries in self._entries.items() if entries}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return sum(self.kinds().values())
