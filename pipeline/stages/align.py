"""Stage 6, ``align``: the frontal landmarks re-posed onto the reference frames (played back and forth
when the audio is longer than the video) -> pixel landmarks, and the rendered dot video (PNGs, drawn
and written a chunk at a time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.stages.context import StageContext, StageResult

__all__ = ["run", "write_landmark_pngs"]


def write_landmark_pngs(folder: Path, lm68: np.ndarray, size: int, chunk: int = 64) -> None:
    """The dot video of ``lm68 [T, 68, 2]`` as ``folder/00000.png ...``, ``chunk`` frames drawn at a
    time (the files :func:`data.video.write_frame_folder` writes for the whole rendered video)."""
    from data.motion_align import render_landmarks
    from data.video import write_frame

    folder.mkdir(parents=True)
    for start in range(0, len(lm68), chunk):
        dots = render_landmarks(lm68[start : start + chunk], (size, size), size=size)  # [n, 3, S, S]
        for i, frame in enumerate(dots.transpose(0, 2, 3, 1), start):
            write_frame(folder / f"{i:05d}.png", frame)


def run(
    ctx: StageContext, ref: StageResult, lms: StageResult, rec: StageResult, atom: StageResult
) -> StageResult:
    """``aligned_lm68``: [n_frames, 68, 2] landmarks driving MToV (also written as
    ``landmarks_png/``); ``reference_posed_lm68``: the reference frames' own projected 3DMM keypoints."""
    from data.motion_align import pingpong_indices

    lm68, coeff, lm3d_std = lms["lm68"], rec["coeff"], rec["lm3d_std"]
    idx = pingpong_indices(len(ref["frames"]), ctx.n_frames)  # reference played back and forth

    def compute(folder: Path) -> dict[str, np.ndarray]:
        from data.motion_align import align_landmarks

        hw = (ctx.size, ctx.size)
        aligned = align_landmarks(atom["frontal_lm3d"], lm68[idx], coeff[idx], lm3d_std, hw)
        # the masking landmarks are the reference frames' own projected 3DMM keypoints, the same
        # kind MToV was trained with (keypoints/non-face-centric/posed)
        posed_ref = align_landmarks(atom["reference_lm3d"], lm68, coeff, lm3d_std, hw)
        write_landmark_pngs(folder / "landmarks_png", np.asarray(aligned), ctx.size)
        return {"aligned_lm68": np.asarray(aligned), "reference_posed_lm68": np.asarray(posed_ref)}

    parts = {"atom": atom.key, "recon": rec.key, "landmarks": lms.key, "n_frames": ctx.n_frames}
    return ctx.run("align", parts, compute)
