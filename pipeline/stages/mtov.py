"""Stage 7, ``mtov``: the landmark dot video -> MToV -> SxS frames, in batches of 16-frame clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.settings import stage_config
from pipeline.stages.context import StageContext, StageResult

__all__ = ["run"]

MODEL_ASSETS = ("autoencoder_rgb", "autoencoder_motion", "diffusion_model")


def run(ctx: StageContext, ref: StageResult, al: StageResult) -> tuple[np.ndarray, np.ndarray]:
    """(generated frames, landmark dot video), both [n_frames, 3, S, S] uint8. The dot video is
    rendered again here (timed as ``render``; cheap) rather than read back from the PNGs."""
    from data.imageops import mask_below_nose
    from data.motion_align import pingpong_indices, render_landmarks

    cfg, rw, size = ctx.cfg, ctx.random_weights, ctx.size
    frames = ref["frames"]
    idx = pingpong_indices(len(frames), ctx.n_frames)  # as in the align stage
    with ctx.timer()("render"):
        landmark_video = render_landmarks(al["aligned_lm68"], (size, size), size=size)  # [T,3,S,S]

    def compute(_: Path) -> dict[str, np.ndarray]:
        from MToV.generate import generate_video
        from MToV.loading import load_mtov

        masked = mask_below_nose(frames, al["reference_posed_lm68"])[idx]  # [T,S,S,3]
        models = ctx.models.load(
            "mtov",
            load_mtov,
            *(None if rw else str(ctx.assets[k]) for k in MODEL_ASSETS),
            config=stage_config(cfg.mtov.config),
            device=ctx.device,
            random_weights=rw,
        )
        video = generate_video(
            models,
            landmark_video,
            np.ascontiguousarray(masked.transpose(0, 3, 1, 2)),
            np.ascontiguousarray(frames[ctx.ref_frame].transpose(2, 0, 1)),
            batch_size=int(cfg.mtov.batch_size),
            seed=int(cfg.mtov.seed),
            start_ratio=float(cfg.mtov.start_ratio),
            sampling_timesteps=int(cfg.mtov.sampling_timesteps),
            use_last_as_reference=bool(cfg.mtov.use_last_as_reference),
            precision=str(cfg.mtov.precision),
            progress=ctx.progress,
        )
        return {"frames": np.asarray(video, np.uint8)}

    # + every mtov.* setting and ref_frame (pipeline.settings.stage_settings)
    models = "random" if rw else [ctx.model_id(k) for k in MODEL_ASSETS]
    mt = ctx.run("mtov", {"align": al.key, "reference": ref.key, "models": models}, compute)
    video = mt["frames"]  # [T, 3, S, S]
    if video.shape[0] != ctx.n_frames:
        raise RuntimeError(f"MToV returned {video.shape[0]} frames for {ctx.n_frames} landmark frames")
    return video, landmark_video
