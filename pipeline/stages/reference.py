"""Stage 1, ``reference``: reference video -> 25 fps -> centre crop SxS (or one photo).

The frames are decoded, cropped and resized a few at a time into ``frames.npy`` in the stage's work
folder, which the later stages read back by index as a memory-mapped array: a long reference video
is never held in memory, at its own size or at SxS.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moditalker.constants import FPS
from moditalker.errors import UserError
from moditalker.fileio import file_sha256
from pipeline.stages.context import StageContext, StageResult

__all__ = ["run", "save_frames"]

CHUNK_BYTES = 64 << 20  #: decoded frames resized together (at most 64 of them)


def save_frames(path: Path, frames: Iterable[np.ndarray], size: int) -> int:
    """Centre-crop and resize uint8 ``[H, W, 3]`` frames to SxS as they come (64 at a time, fewer for
    large frames) and store them as one ``.npy`` ``[N, S, S, 3]`` (the same bytes as ``np.save`` of
    :func:`data.imageops.resize_crop` of all of them); returns N."""
    from data.imageops import resize_crop

    raw, n = path.with_name(path.name + ".raw"), 0
    try:
        with open(raw, "wb") as f:
            chunk: list[np.ndarray] = []
            for frame in frames:
                chunk.append(frame)
                if len(chunk) >= min(64, max(1, CHUNK_BYTES // frame.nbytes)):
                    f.write(resize_crop(np.stack(chunk), size).tobytes())
                    n, chunk = n + len(chunk), []
            if chunk:
                f.write(resize_crop(np.stack(chunk), size).tobytes())
                n += len(chunk)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
        with open(path, "wb") as out, open(raw, "rb") as f:
            np.lib.format.write_array_header_1_0(out, {**header, "shape": (n, size, size, 3)})
            while block := f.read(1 << 24):
                out.write(block)
    finally:
        raw.unlink(missing_ok=True)
    return n


def run(ctx: StageContext) -> StageResult:
    """``frames``: [N, S, S, 3] uint8 (memory-mapped), as many as the audio needs (``reference.max_frames``
    caps them; at least ``ref_frame + 1``); the video is later played back and forth to cover the audio."""
    cfg, inputs = ctx.cfg, ctx.inputs
    max_ref = (
        ctx.n_frames if cfg.reference.max_frames is None else min(ctx.n_frames, int(cfg.reference.max_frames))
    )
    max_ref = max(max_ref, ctx.ref_frame + 1)

    def compute(folder: Path) -> dict[str, np.ndarray]:
        from data.video import iter_video, read_image

        if inputs.ref_is_image:
            save_frames(folder / "frames.npy", [read_image(inputs.ref)], ctx.size)
        else:
            save_frames(folder / "frames.npy", iter_video(inputs.ref, fps=FPS, max_frames=max_ref), ctx.size)
        return {}  # frames.npy is read back memory-mapped (an entry of an older layout lists it)

    parts = {
        "file": file_sha256(inputs.ref),
        "image": inputs.ref_is_image,
        "max_frames": 1 if inputs.ref_is_image else max_ref,
    }
    ref = ctx.run("reference", parts, compute)
    frames = np.load(ctx.cache.entry("reference", ref.key) / "frames.npy", mmap_mode="r")
    n_ref = len(frames)
    if ctx.ref_frame >= n_ref:
        raise UserError(f"--ref_frame {ctx.ref_frame} is past the end of {inputs.ref} ({n_ref} frames)")
    return StageResult({"frames": frames}, ref.key)
