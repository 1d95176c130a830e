"""Stage 6, ``align``: the frontal landmarks re-posed onto the reference frames (played back and forth
when the audio is longer than the video) -> pixel landmarks, and the rendered dot video (PNGs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.stages.context import StageContext, StageResult

__all__ = ["run"]


def run(
    ctx: StageContext, ref: StageResult, lms: StageResult, rec: StageResult, atom: StageResult
) -> StageResult:
    """``aligned_lm68``: [n_frames, 68, 2] landmarks driving MToV (also written as
    ``landmarks_png/``); ``reference_posed_lm68``: the reference frames' own projected 3DMM keypoints."""
    from data.motion_align import pingpong_indices

    lm68, coeff, lm3d_std = lms["lm68"], rec["coeff"], rec["lm3d_std"]
    idx = pingpong_indices(len(ref["frames"]), ctx.n_frames)  # reference played back and forth

    def compute(folder: Path) -> dict[str, np.ndarray]:
        from data.motion_align import align_landmarks, render_landmarks
        from data.video import write_frame_folder

        hw = (ctx.size, ctx.size)
        aligned = align_landmarks(atom["frontal_lm3d"], lm68[idx], coeff[idx], lm3d_std, hw)
        # the masking landmarks are the reference frames' own projected 3DMM keypoints, the same
        # kind MToV was trained with (keypoints/non-face-centric/posed)
        posed_ref = align_landmarks(atom["reference_lm3d"], lm68, coeff, lm3d_std, hw)
        dots = render_landmarks(aligned, hw, size=ctx.size)  # [T, 3, S, S]
        write_frame_folder(folder / "landmarks_png", dots, channels_first=True)
        return {"aligned_lm68": np.asarray(aligned), "reference_posed_lm68": np.asarray(posed_ref)}

    parts = {"atom": atom.key, "recon": rec.key, "landmarks": lms.key, "n_frames": ctx.n_frames}
    return ctx.run("align", parts, compute)
