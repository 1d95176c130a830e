"""The condition-latent cache of MToV sampling: a clip whose frames were encoded before (a still
reference image gives the same masked clip every time) reuses its latent. Used by
:func:`MToV.generate.stream_video` (and importable from :mod:`MToV.generate`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from MToV.models.autoencoder import ViTAutoencoder

__all__ = ["ClipLatentCache", "clip_keys"]


def clip_keys(frames: np.ndarray, clip: int) -> list[bytes]:
    """One content hash per ``clip``-frame clip of uint8 ``[T, ...]`` frames (the last clip padded by
    repeating its last frame, as :func:`pad_clips`): equal keys = equal clips = equal latents."""
    frames = np.ascontiguousarray(frames)
    keys = []
    for start in range(0, frames.shape[0], clip):
        block = frames[start : start + clip]
        h = hashlib.blake2b(block.tobytes(), digest_size=16)
        h.update(frames[-1].tobytes() * (clip - block.shape[0]))  # the padding frames
        keys.append(h.digest())
    return keys


class ClipLatentCache:
    """Latents by clip content: a clip seen before (a still reference image gives the same masked
    clip every time; a reference video played back and forth repeats clips) is not encoded again.

    ``extract(ae, clips)`` encodes a batch of clips; ``cache(ae, clips, keys)`` returns the latents of
    ``clips`` (keys from :func:`clip_keys`), encoding only the distinct clips not seen before.
    ``capacity`` (clips per autoencoder; None: no limit) drops the oldest latents first (first in,
    first out), so the cache of a video of any length stays bounded; its state is then a function
    of the latents added, in order (:meth:`take_added`), which :meth:`restore` replays.
    """

    def __init__(
        self, extract: Callable[[ViTAutoencoder, torch.Tensor], torch.Tensor], capacity: int | None = None
    ) -> None:
        self.extract, self.latents, self.capacity = extract, {}, capacity
        self.added: list[tuple[ViTAutoencoder, bytes, torch.Tensor]] = []

    def __call__(self, ae: ViTAutoencoder, clips: torch.Tensor, keys: Sequence[bytes]) -> torch.Tensor:
        found = {k: self.latents[(id(ae), k)] for k in keys if (id(ae), k) in self.latents}
        todo: dict[bytes, int] = {}
        for j, k in enumerate(keys):
            if k not in found and k not in todo:
                todo[k] = j
        if todo:
            new = self.extract(ae, clips[list(todo.values())])
            for k, latent in zip(todo, new):
                found[k] = latent
                self.restore(ae, [k], latent[None], record=True)
        return torch.stack([found[k] for k in keys])

    def restore(
        self, ae: ViTAutoencoder, keys: Sequence[bytes], latents: torch.Tensor, record: bool = False
    ) -> None:
        """Add ``latents`` [m, ...] of clips ``keys`` (as an encode would), dropping the oldest beyond
        ``capacity``; ``record``: also list them for :meth:`take_added`."""
        for k, latent in zip(keys, latents):
            self.latents[(id(ae), k)] = latent
            if record:
                self.added.append((ae, k, latent))
        if self.capacity is not None:
            mine = [key for key in self.latents if key[0] == id(ae)]
            for key in mine[: max(0, len(mine) - self.capacity)]:
                del self.latents[key]

    def take_added(self) -> list[tuple[ViTAutoencoder, bytes, torch.Tensor]]:
        """The latents encoded since the last call, in the order they were added."""
        added, self.added = self.added, []
        return added
