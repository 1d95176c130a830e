"""Stage 1, ``reference``: reference video -> 25 fps -> centre crop SxS (or one photo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moditalker.constants import FPS
from moditalker.errors import UserError
from pipeline.cache import file_digest
from pipeline.stages.context import StageContext, StageResult

__all__ = ["run"]


def run(ctx: StageContext) -> StageResult:
    """``frames``: [N, S, S, 3] uint8, as many as the audio needs (``reference.max_frames`` caps them;
    at least ``ref_frame + 1``); the video is later played back and forth to cover the audio."""
    cfg, inputs = ctx.cfg, ctx.inputs
    max_ref = (
        ctx.n_frames if cfg.reference.max_frames is None else min(ctx.n_frames, int(cfg.reference.max_frames))
    )
    max_ref = max(max_ref, ctx.ref_frame + 1)

    def compute(_: Path) -> dict[str, np.ndarray]:
        from data.imageops import resize_crop
        from data.video import read_image, read_video

        if inputs.ref_is_image:
            raw = read_image(inputs.ref)[None]
        else:
            raw, _fps = read_video(inputs.ref, fps=FPS, max_frames=max_ref)
        return {"frames": resize_crop(raw, ctx.size)}

    parts = {
        "file": file_digest(inputs.ref),
        "image": inputs.ref_is_image,
        "max_frames": 1 if inputs.ref_is_image else max_ref,
    }
    ref = ctx.run("reference", parts, compute)
    n_ref = len(ref["frames"])
    if ctx.ref_frame >= n_ref:
        raise UserError(f"--ref_frame {ctx.ref_frame} is past the end of {inputs.ref} ({n_ref} frames)")
    return ref
