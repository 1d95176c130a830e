"""Stage 2, ``landmarks``: FAN 68-point 2D landmarks of the reference frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stages.context import StageContext, StageResult

__all__ = ["run"]


def run(ctx: StageContext, ref: StageResult, detector: Any = None) -> StageResult:
    """``lm68``: [N, 68, 2] pixel landmarks; frames without a face are interpolated (none at all:
    UserError). ``detector`` replaces FAN + s3fd (see :func:`pipeline.inference.run_inference`)."""
    frames = ref["frames"]
    rw = ctx.random_weights

    def compute(_: Path) -> dict[str, np.ndarray]:
        from data.landmarks import FaceLandmarkDetector, template_face_detector

        injected = detector if detector is not None else (template_face_detector if rw else None)
        det = ctx.models.load(
            "face_alignment",
            FaceLandmarkDetector,
            device=ctx.device,
            weights_dir=ctx.cfg.assets.face_alignment or None,  # None: checkpoints/ or the torch-hub cache
            detector=injected,
        )
        lm68, n_interp = det.detect(frames, progress=ctx.progress, source=str(ctx.inputs.ref))
        if n_interp:
            ctx.log(f"[landmarks] no face in {n_interp} of {len(frames)} reference frames: interpolated")
        return {"lm68": np.asarray(lm68, np.float32)}

    if detector is not None:  # not reusable across processes: key on the object itself
        det_id = f"injected:{getattr(detector, '__qualname__', type(detector).__name__)}:{id(detector)}"
    else:
        det_id = ctx.model_id("face_alignment", "template")
    return ctx.run("landmarks", {"reference": ref.key, "detector": det_id}, compute)
