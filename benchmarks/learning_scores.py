"""Scores of the learning benchmark (:mod:`benchmarks.learning`) on the synthetic world's held-out
sentences: PSNR and mouth darkness of frames, AToM's mouth-opening correlation, MToV driven by the
true (or another sentence's) landmarks, the end-to-end run, and what the autoencoders' latents hold."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, box: Sequence[int] | None = None) -> float:
    """PSNR (dB, peak 255) of uint8 frames ``[..., H, W, 3]``, inside ``box`` (x0, y0, x1, y1) if given."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if box is not None:
        x0, y0, x1, y1 = box
        a, b = a[..., y0:y1, x0:x1, :], b[..., y0:y1, x0:x1, :]
    mse = float(((a - b) ** 2).mean())
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 for a constant series (a mouth that never changes)."""
    return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 1e-9 and np.std(b) > 1e-9 else 0.0


def mouth_darkness(frames: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """255 minus the mean luminance inside ``box`` per frame of uint8 ``[T, H, W, 3]``."""
    x0, y0, x1, y1 = box
    region = np.asarray(frames, np.float64)[:, y0:y1, x0:x1, :]
    return 255.0 - (region @ np.array([0.299, 0.587, 0.114])).mean(axis=(1, 2))


# ------------------------------------------------------------------------------------------------
# evaluation


def read_clip(hdtf: Path, cid: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 frames [T, S, S, 3], pixel landmarks [T, 68, 2]) of one clip of the world's tree."""
    from data.video import read_frame_folder

    frames = read_frame_folder(hdtf / "frames" / cid, what="frames")
    kp = hdtf / "keypoints" / "non-face-centric" / "posed" / cid
    lm = np.stack([np.load(kp / f"{t:05d}.npy") for t in range(len(frames))])
    return frames, lm


def sample_clip(
    models,
    reference: np.ndarray,
    landmarks: np.ndarray,
    *,
    ref_landmarks: np.ndarray | None = None,
    sampling_timesteps: int = 100,
    start_ratio: float = 0.25,
    seed: int = 0,
    precision: str = "fp32",
) -> np.ndarray:
    """MToV frames uint8 ``[T, S, S, 3]`` for pixel ``landmarks [T, 68, 2]`` (at the reference's size
    S), with ``reference [N, S, S, 3]`` (masked below the nose with ``ref_landmarks``, default
    ``landmarks``; its frame 0 the identity), through :func:`MToV.generate.generate_video`. The dots
    are drawn with the radius the models were trained with (their config's ``data.landmark_radius``)."""
    from data.motion_align import render_landmarks
    from MToV.conditions import build_conditions, condition_settings
    from MToV.generate import generate_video

    size = reference.shape[1]
    _, radius = condition_settings(models)
    lm_video = render_landmarks(landmarks, (size, size), size=size, radius=radius)
    conditions = build_conditions(
        reference, lm_video, size, landmarks=landmarks, ref_landmarks=ref_landmarks, identity_frame=0
    )
    video = generate_video(
        models,
        *conditions,
        seed=seed,
        start_ratio=start_ratio,
        sampling_timesteps=sampling_timesteps,
        progress=False,
        precision=precision,
    )
    return video.transpose(0, 2, 3, 1)


def _openings(world: dict, ids: Sequence[str], clips: Sequence[np.ndarray]) -> np.ndarray:
    """The true mouth opening of each of ``clips`` (the first frames of the clips ``ids``), concatenated."""
    return np.concatenate([np.asarray(world["clips"][c]["opening"])[: len(f)] for c, f in zip(ids, clips)])


def mtov_scores(models, world: dict, hdtf: Path, passes: dict[int, int], seed: int) -> dict:
    """PSNR of MToV (driven by the true landmarks) and of the reference copy on the held-out clips."""
    box = world["lip_box"]
    truth, copies, generated, wrong, wrong_truth = [], [], {p: [] for p in passes}, [], []
    ids = world["heldout_ids"]
    for k, cid in enumerate(ids):
        frames, lm = read_clip(hdtf, cid)
        truth.append(frames)
        copies.append(np.repeat(frames[:1], len(frames), axis=0))
        for p, steps in passes.items():
            generated[p].append(sample_clip(models, frames, lm, sampling_timesteps=steps, seed=seed))
        # the control: the landmarks of another sentence (fewest passes) must give a worse mouth
        _, other = read_clip(hdtf, ids[(k + 1) % len(ids)])
        n = min(len(lm), len(other))
        wrong.append(
            sample_clip(models, frames[:n], other[:n], ref_landmarks=lm[:n],
                        sampling_timesteps=passes[min(passes)], seed=seed)
        )  # fmt: skip
        wrong_truth.append(frames[:n])
    t, c, w = np.concatenate(truth), np.concatenate(copies), np.concatenate(wrong)
    gen = {p: np.concatenate(clips) for p, clips in generated.items()}
    table = {str(p): {"mouth_psnr": psnr(g, t, box), "psnr": psnr(g, t)} for p, g in gen.items()}
    main_p = str(max(passes))
    return {
        "mouth_psnr_heldout": table[main_p]["mouth_psnr"],
        "mouth_psnr_reference_copy": psnr(c, t, box),
        "psnr_heldout": table[main_p]["psnr"],
        "psnr_reference_copy": psnr(c, t),
        "mouth_psnr_wrong_landmarks": psnr(w, np.concatenate(wrong_truth), box),
        # does the generated mouth open with the true opening? (fewest passes; the control: driven by
        # another sentence's landmarks it should not)
        "mouth_dark_corr": _corr(mouth_darkness(gen[min(passes)], box), _openings(world, ids, truth)),
        "mouth_dark_corr_wrong_landmarks": _corr(mouth_darkness(w, box), _openings(world, ids, wrong_truth)),
        "passes": table,
        "lip_box": box,
    }


def atom_landmarks(diffusion, npz: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(generated frontal landmarks [T, 68, 3], true ones) of one AToM clip, as the pipeline calls AToM."""
    from AToM.inference import generate_landmarks
    from data.face3d import canonical_face_lm68

    data = np.load(npz)
    mean = canonical_face_lm68().astype(np.float32)
    true = data["idexp_lm3d"] / 10.0 + mean
    cfg = diffusion.atom_config
    lm = generate_landmarks(
        diffusion,
        data["hubert"],
        true[0],
        mean,
        steps=int(cfg.sample.steps),
        guidance_weight=float(cfg.diffusion.guidance_weight),
        seed=seed,
        progress=False,
    )
    return lm, true


def atom_mouth_corr(diffusion, world_dir: Path, ids: Sequence[str], seed: int) -> float:
    """Pearson correlation of the generated and the true mouth opening over all frames of ``ids``."""
    from data.synthetic import mouth_gap3d

    pred, true = [], []
    for cid in ids:
        lm, lm_true = atom_landmarks(diffusion, world_dir / "atom" / "val" / f"{cid}.npz", seed)
        pred.append(mouth_gap3d(lm))
        true.append(mouth_gap3d(lm_true))
    p, t = np.concatenate(pred), np.concatenate(true)
    if p.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(p, t)[0, 1])


def end_to_end_scores(atom, models, world: dict, world_dir: Path, seed: int) -> dict:
    """Audio in: AToM's landmarks -> the photo's pixels -> MToV (still photo as reference); the
    correlation of the generated mouth's darkness with the true opening, and for the true frames."""
    from data.face3d import canonical_face_lm68
    from data.synthetic import Face, load_face, render_frames

    size, box = world["size"], world["lip_box"]
    face = Face(
        image=np.zeros((world["face_size"],) * 2 + (3,), np.uint8),
        landmarks=np.asarray(world["face_landmarks"]),
        affine=np.asarray(world["face_affine"]),
    )
    hdtf = world_dir / "hdtf"
    # the still reference: the photo at rest (no mouth motion), as a user's still image
    photo = load_face()
    still = render_frames(photo, face.landmarks[None], np.zeros(1), size)
    rest = (face.landmarks * size / world["face_size"])[None].astype(np.float32)
    mean = canonical_face_lm68()
    dark_gen, dark_true, opening = [], [], []
    for cid in world["heldout_ids"]:
        lm3d, _ = atom_landmarks(atom, world_dir / "atom" / "val" / f"{cid}.npz", seed)
        px = face.project(lm3d - mean) * size / world["face_size"]
        frames = sample_clip(models, still, px.astype(np.float32), ref_landmarks=rest, seed=seed)
        true_frames, _ = read_clip(hdtf, cid)
        dark_gen.append(mouth_darkness(frames, box))
        dark_true.append(mouth_darkness(true_frames, box))
        opening.append(np.asarray(world["clips"][cid]["opening"]))
    o = np.concatenate(opening)
    gen, tru = np.concatenate(dark_gen), np.concatenate(dark_true)
    return {"mouth_dark_corr": _corr(gen, o), "mouth_dark_corr_true_frames": _corr(tru, o)}


def latent_report(ae, world: dict, hdtf: Path, mode: str, radius: int) -> dict:
    """What an MToV autoencoder's tri-plane latent holds of the mouth (``mode`` rgb: the frames;
    ldmk: the landmark dots of ``radius``): the share of latent values beyond 0.99 (tanh saturation),
    their spread across the clips' windows, and the R^2 of a ridge read-out of each frame's mouth
    opening from that frame's yt|xt latent columns, fitted on the rendered training sentences and
    scored on the held-out ones. A latent that does not hold the opening cannot make the UNet follow
    it, however long the UNet trains."""
    import torch

    from data.motion_align import render_landmarks
    from data.synthetic import ridge_r2
    from MToV.latents import spread_stats

    s, size = ae.s, world["size"]

    def features(cid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frames, lm = read_clip(hdtf, cid)
        video = (
            frames.transpose(0, 3, 1, 2)
            if mode == "rgb"
            else render_landmarks(lm, (size, size), size=size, radius=radius)
        )
        n = len(video) // s * s
        x = torch.from_numpy(video[:n].astype(np.float32) / 127.5 - 1)
        x = x.view(n // s, s, 3, size, size).transpose(1, 2)
        with torch.inference_mode():
            z = ae.extract(x.to(next(ae.parameters()).device)).float().cpu()
        _, yt, xt = ae.split_latent(z)
        per_frame = torch.cat([yt, xt], 1).permute(0, 2, 1, 3).reshape(n, -1).numpy()
        return z.numpy(), per_frame, np.asarray(world["clips"][cid]["opening"])[:n]

    train = [c for c in world["train_ids"] if world["clips"][c]["rendered"]]
    fit = [features(c) for c in train]
    test = [features(c) for c in world["heldout_ids"]]
    z = np.concatenate([f[0] for f in fit])
    x, y = np.concatenate([f[1] for f in fit]), np.concatenate([f[2] for f in fit])
    xh, yh = np.concatenate([f[1] for f in test]), np.concatenate([f[2] for f in test])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a, ah = (x - mu) / sd, (xh - mu) / sd
    r2 = ridge_r2(a, y - y.mean(), ah, yh - y.mean(), 10.0)  # x is centred: no intercept column
    stats = spread_stats(z)
    return {
        "saturated": stats["saturated"],
        "spread": None if stats["spread_mean"] is None else round(stats["spread_mean"], 5),
        "spread_median": None if stats["spread_median"] is None else round(stats["spread_median"], 6),
        "opening_r2": round(r2, 4),
    }
