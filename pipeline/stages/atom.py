"""Stage 5, ``atom``: AToM -> frontal 3D landmarks for the whole audio (2 HuBERT frames per video frame)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.settings import stage_config
from pipeline.stages.context import StageContext, StageResult

__all__ = ["run", "frontal_of_reference"]


def frontal_of_reference(bfm_dir: Path, coeff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frontal 3D landmarks ([N, 68, 3], identity + expression of each reference frame) and the BFM's
    key mean shape ([68, 3])."""
    from data.face3d import Face3DHelper, idexp_to_lm3d

    helper = Face3DHelper(bfm_dir)
    parts = helper.split_coeff(coeff)
    idexp = helper.reconstruct_idexp_lm3d(parts["identity"], parts["expression"]).cpu().numpy()
    key_mean = helper.key_mean_shape.cpu().numpy()
    return idexp_to_lm3d(idexp, key_mean).astype(np.float32), key_mean.astype(np.float32)


def run(ctx: StageContext, hub: StageResult, rec: StageResult) -> StageResult:
    """``frontal_lm3d``: [n_frames, 68, 3] generated landmarks; ``reference_lm3d``: the reference's own."""
    cfg, trained = ctx.cfg, ctx.trained("atom")

    def compute(_: Path) -> dict[str, np.ndarray]:
        from AToM.inference import generate_landmarks, load_atom

        ref_lm3d_all, key_mean = frontal_of_reference(ctx.bfm_dir, rec["coeff"])
        diffusion = ctx.models.load(
            "atom",
            load_atom,
            str(ctx.assets["atom"]) if trained else None,
            config=stage_config(cfg.atom.config),
            ema=bool(cfg.atom.ema),
            device=ctx.device,
            random_weights=not trained,
        )
        lm3d = generate_landmarks(
            diffusion,
            hub["hubert"],
            ref_lm3d_all[ctx.ref_frame],
            key_mean,
            steps=int(cfg.atom.steps),
            eta=float(cfg.atom.eta),
            guidance_weight=float(cfg.atom.guidance_weight),
            seed=int(cfg.atom.seed),
            progress=ctx.progress,
        )
        return {"frontal_lm3d": np.asarray(lm3d, np.float32)[: ctx.n_frames], "reference_lm3d": ref_lm3d_all}

    # + every atom.* setting and ref_frame (pipeline.settings.stage_settings)
    parts = {"hubert": hub.key, "recon": rec.key, "model": ctx.model_id("atom")}
    out = ctx.run("atom", parts, compute)
    if len(out["frontal_lm3d"]) < ctx.n_frames:
        raise RuntimeError(f"AToM returned {len(out['frontal_lm3d'])} frames for {ctx.n_frames} video frames")
    return out
