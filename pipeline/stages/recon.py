"""Stage 3, ``recon``: Deep3DFaceRecon 257 3DMM coefficients of the reference frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.stages.context import StageContext, StageResult

__all__ = ["run"]


def run(ctx: StageContext, ref: StageResult, lms: StageResult) -> StageResult:
    """``coeff``: [N, 257] coefficients; ``lm3d_std``: the BFM's standard 3D landmarks."""
    rw = ctx.random_weights

    def compute(_: Path) -> dict[str, np.ndarray]:
        from data.recon3d import FaceReconstructor

        rec = ctx.models.load(
            "deep3d",
            FaceReconstructor,
            weights=None if rw else ctx.assets["deep3d"],
            bfm_dir=ctx.bfm_dir,
            device=ctx.device,
            random_weights=rw,
            seed=ctx.seed,
            same_as={"bfm_dir": f"synthetic:{ctx.cfg.seed}"} if rw else None,
        )
        coeff = rec.reconstruct(ref["frames"], lms["lm68"])
        return {"coeff": np.asarray(coeff, np.float32), "lm3d_std": np.asarray(rec.lm3d_std, np.float32)}

    parts = {
        "landmarks": lms.key,
        "model": ctx.model_id("deep3d", f"random:{ctx.cfg.seed}"),
        "bfm": ctx.model_id("bfm_front", f"synthetic:{ctx.cfg.seed}"),
    }
    return ctx.run("recon", parts, compute)
