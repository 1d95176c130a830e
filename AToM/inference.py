"""AToM inference: HuBERT features + a reference landmark -> frontal 3D landmarks for the whole audio.

``python -m AToM.inference --hubert H.npy --ref_lm3d R.npy --out OUT.npy --checkpoint checkpoints/atom.pt``

Reference conversion (a bug of the original, fixed here; see docs/differences.md): the network was
trained on ``idexp_lm3d`` (x10 offsets from the BFM mean shape) but the original inference fed it the
absolute landmark. We convert first, ``ref_idexp = (ref_lm3d - key_mean_shape) * 10``, and return
``(residual + ref_idexp) / 10 + key_mean_shape``.

Long audio: overlapping windows of ``horizon`` frames. Each later window inpaints the first half of
its overlap with the frames already generated (EDGE-style: at every DDIM step the known region is
replaced by ``q_sample`` of the known values); over the second half of the overlap the output is
cross-faded (raised cosine) from the previous window's frames to the new window's, so a small
disagreement between windows (or a kink at the inpainting boundary) is spread out instead of showing
as a jump. As in training, a window's
reference is its own first frame: for window k > 0 that is the already generated frame at the window
start, and the known overlap is re-expressed as residuals w.r.t. it (so the known residual of frame 0
is exactly 0, as the model saw in training). Audio shorter than a window is edge-padded to one window
and trimmed.

Memory on long audio: the HuBERT features stay on the host (float32 input is not copied) and each
window's part goes to the device when the window runs, so the device holds one window's features,
activations and the ``[T, 204]`` result (816 bytes per frame) whatever the length. The windows run one
after another: each depends on the previous one's frames (the inpainted overlap and its reference),
so running several at once would change the landmarks; within a window the guided and unguided
passes are already batched (``guidance_mode``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from AToM.common import as_config, build_diffusion, load_weights, read_checkpoint
from AToM.diffusion import GUIDANCE_MODES, GaussianDiffusion
from data.face3d import idexp_to_lm3d, lm3d_to_idexp
from moditalker.assets import random_weights_banner
from moditalker.config import save_config
from moditalker.device import original_attention, resolve_device
from moditalker.errors import UserError, cli_main, script_prog
from moditalker.fileio import atomic_path, check_output, load_npy, save_npy


def load_atom(
    checkpoint: str | Path | None,
    config: str | Path | dict | DictConfig | None = None,
    ema: bool = False,
    device: str | torch.device = "cpu",
    random_weights: bool = False,
) -> GaussianDiffusion:
    """Build AToM and load ``model_state_dict`` (or ``ema_state_dict`` with ``ema=True``), strict.

    Config: ``config`` if given, else the one stored in our checkpoints, else the official full size.
    ``random_weights=True`` without a checkpoint gives a deterministic random model (smoke tests).
    The resolved config is attached as ``diffusion.atom_config``.
    """
    if checkpoint is None and not random_weights:
        raise UserError("no AToM checkpoint given; pass --checkpoint (or --random_weights for a smoke test)")
    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    if config is None and ckpt is not None and isinstance(ckpt.get("config"), dict):
        stored = ckpt["config"]
        config = {k: stored[k] for k in ("model", "diffusion", "sample") if k in stored}
    cfg = as_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        diffusion = build_diffusion(cfg)
    if ckpt is not None:
        key = "ema_state_dict" if ema else "model_state_dict"
        if key not in ckpt:
            raise UserError(f"{checkpoint} has no {key}; drop --ema or use another checkpoint")
        load_weights(diffusion.model, ckpt[key], checkpoint, key)
    diffusion.atom_config = cfg
    return diffusion.to(resolve_device(device)).eval()


def _check_inputs(diffusion: GaussianDiffusion, hubert, ref_lm3d, key_mean_shape) -> tuple:
    hubert = np.asarray(hubert)
    ref_lm3d = np.asarray(ref_lm3d)
    key_mean_shape = np.asarray(key_mean_shape)
    dim = diffusion.model.cond_feature_dim
    if hubert.ndim != 2 or hubert.shape[1] != dim:
        raise UserError(f"HuBERT features must be [T_a, {dim}], got shape {hubert.shape}")
    if hubert.shape[0] < 2:
        raise UserError(
            f"audio too short: {hubert.shape[0]} HuBERT frame(s), need at least 2 (one video frame)"
        )
    if ref_lm3d.shape != (68, 3):
        raise UserError(f"reference landmark must be [68, 3], got shape {ref_lm3d.shape}")
    if key_mean_shape.shape != (68, 3):
        raise UserError(f"key_mean_shape must be [68, 3], got shape {key_mean_shape.shape}")
    for name, a in (("HuBERT features", hubert), ("reference landmark", ref_lm3d)):
        real = np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
        if not real or not np.isfinite(a).all():
            raise UserError(f"{name} contain NaN/inf or are not real numbers (dtype {a.dtype})")
    # float32 input is not copied (HuBERT-large features of a long audio are 200 KB per second)
    return tuple(np.asarray(a, dtype=np.float32) for a in (hubert, ref_lm3d, key_mean_shape))


def window_starts(n_frames: int, horizon: int, overlap: int) -> list[int]:
    """Start frames of the windows covering ``n_frames`` (last window flush with the end)."""
    if n_frames <= horizon:
        return [0]
    stride = horizon - overlap
    starts = list(range(0, n_frames - horizon, stride))
    return starts + [n_frames - horizon]


@torch.inference_mode()
def generate_landmarks(
    diffusion: GaussianDiffusion,
    hubert: np.ndarray,
    ref_lm3d: np.ndarray,
    key_mean_shape: np.ndarray,
    *,
    steps: int = 50,
    eta: float = 1.0,
    guidance_weight: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    overlap: int | None = None,
    guidance_mode: str = "auto",
) -> np.ndarray:
    """Frontal landmarks ``float32 [T_a // 2, 68, 3]`` (BFM space) for the whole audio.

    ``ref_lm3d`` is the absolute frontal reference landmark (``idexp / 10 + key_mean_shape``).
    ``overlap`` (frames shared by consecutive windows) defaults to the config's ``sample.overlap``.
    Deterministic for a given ``seed`` (noise comes from a CPU generator on every device).
    ``guidance_mode`` (``"auto"``, ``"batched"``, ``"two_pass"`` or ``"original"``, see
    :data:`AToM.diffusion.GUIDANCE_MODES`) picks how the classifier-free guidance is evaluated; the
    landmarks are the same up to float rounding (``"original"``: the original's two full passes per
    step, re-encoding the conditions each time; the benchmark's ``faithful`` mode).
    """
    hubert, ref_lm3d, key_mean_shape = _check_inputs(diffusion, hubert, ref_lm3d, key_mean_shape)
    if steps < 1 or steps > diffusion.n_timestep:
        raise UserError(f"steps must be in 1..{diffusion.n_timestep}, got {steps}")
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must be in [0, 1], got {eta}")
    if not np.isfinite(guidance_weight):
        raise UserError(f"guidance weight must be a finite number, got {guidance_weight}")
    if not 0 <= int(seed) < 2**63:
        raise UserError(f"seed must be in 0..2**63-1, got {seed}")
    if guidance_mode not in GUIDANCE_MODES:
        raise UserError(f"guidance_mode must be one of {', '.join(GUIDANCE_MODES)}, got {guidance_mode!r}")
    w = diffusion.horizon
    if overlap is None:
        cfg = getattr(diffusion, "atom_config", None)
        overlap = int(cfg.sample.overlap) if cfg is not None and "sample" in cfg else w // 4
    overlap = int(overlap)
    if not 0 <= overlap < w:
        raise UserError(f"overlap must be in 0..{w - 1} frames (window {w}), got {overlap}")
    device = diffusion.betas.device
    n = hubert.shape[0] // 2
    hub = torch.from_numpy(hubert[: 2 * n])  # on the host; each window's part goes to the device in turn
    if n < w:  # short audio: repeat the last HuBERT frame up to one window, trim afterwards
        hub = torch.cat([hub, hub[-1:].expand(2 * w - 2 * n, -1)])
    ref0 = torch.from_numpy(lm3d_to_idexp(ref_lm3d, key_mean_shape).reshape(-1)).to(device)
    out = torch.zeros(max(n, w), 204, device=device)  # absolute idexp landmarks
    gen = torch.Generator().manual_seed(int(seed))
    filled = 0
    starts = window_starts(n, w, overlap)
    for k, s in enumerate(tqdm(starts, desc="AToM windows", disable=not progress or len(starts) == 1)):
        ref = ref0 if k == 0 else out[s].clone()
        face = ref.expand(1, w, -1)
        known = None
        n_known = filled - s  # frames of this window already generated (the overlap)
        n_inpaint = (n_known + 1) // 2  # first half: inpainted; second half: cross-faded
        if n_known > 0:
            mask = torch.zeros(1, w, 1, device=device)
            mask[:, :n_inpaint] = 1
            values = torch.zeros(1, w, 204, device=device)
            values[0, :n_inpaint] = out[s : s + n_inpaint] - ref
            known = (mask, values)
        with original_attention(device):  # on the CPU: the original's arithmetic, bit for bit
            res = diffusion.ddim_sample(
                (1, w, 204),
                face,
                None,
                hub[2 * s : 2 * (s + w)][None].to(device),
                steps=steps,
                eta=eta,
                guidance_weight=guidance_weight,
                generator=gen,
                known=known,
                progress=progress and len(starts) == 1,
                guidance_mode=guidance_mode,
            )
        new = res[0] + ref
        m = n_known - n_inpaint
        if m > 0:  # raised-cosine cross-fade from the previous window to this one
            ramp = torch.arange(1, m + 1, device=device, dtype=new.dtype)[:, None] / (m + 1)
            alpha = 0.5 - 0.5 * torch.cos(torch.pi * ramp)
            out[s + n_inpaint : filled] = (1 - alpha) * out[s + n_inpaint : filled] + alpha * new[
                n_inpaint:n_known
            ]
        new_from = max(n_known, 0)
        out[s + new_from : s + w] = new[new_from:]
        filled = s + w
    lm = idexp_to_lm3d(out[:n].reshape(n, 68, 3), torch.from_numpy(key_mean_shape).to(device))
    lm = lm.float().cpu().numpy()
    if not np.isfinite(lm).all():  # finite but huge inputs (|x| ~ 1e30) overflow inside the network
        raise UserError(
            "AToM produced NaN/inf landmarks: the inputs are out of range (HuBERT features up to "
            f"{np.abs(hubert).max():.3g}, reference landmark up to {np.abs(ref_lm3d).max():.3g}); "
            "pass HuBERT features from data.audio and a BFM-space reference landmark"
        )
    return lm


def render_previews(lm3d: np.ndarray, folder: str | Path, size: int = 256) -> None:
    """PNG per frame: black dots on white, ``x * size/2 + size/2`` with y flipped (as the original)."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = size / 2
    for i, frame in enumerate(tqdm(lm3d, desc="previews", leave=False)):
        img = np.full((size, size, 3), 255, np.uint8)
        for x, y in frame[:, :2]:
            cv2.circle(img, (int(x * half + half), int(size - 1 - (y * half + half))), 2, (0, 0, 0), -1)
        with atomic_path(folder / f"{i:05d}.png") as tmp:
            cv2.imwrite(str(tmp), img)


RANDOM_WEIGHTS_WARNING = random_weights_banner(
    "AToM is", "Without BFM_model_front.mat the face is synthetic. The landmarks are NOT a prediction."
)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog=script_prog("python -m AToM.inference"),
        description="AToM: HuBERT features + reference landmark -> frontal landmarks.",
    )
    ap.add_argument("--hubert", required=True, help="HuBERT features .npy [T_a, 1024] (50 Hz)")
    ap.add_argument("--ref_lm3d", required=True, help="reference frontal landmark .npy [68, 3] (BFM space)")
    ap.add_argument(
        "--ref_frame",
        type=int,
        default=None,
        help="the frame of a [T, 68, 3] --ref_lm3d (e.g. a pipeline work folder's reference_lm3d.npy)",
    )
    ap.add_argument("--out", required=True, help="output .npy float32 [T_a // 2, 68, 3]")
    ap.add_argument("--checkpoint", default=None, help="AToM checkpoint (default checkpoints/atom.pt)")
    ap.add_argument("--ema", action="store_true", help="use ema_state_dict instead of model_state_dict")
    ap.add_argument(
        "--config", default=None, help="AToM YAML (default: stored in checkpoint, else full size)"
    )
    ap.add_argument(
        "--bfm_dir", default=None, help="folder with BFM_model_front.mat (default checkpoints/BFM)"
    )
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1, stochastic)")
    ap.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance weight (default 2)")
    ap.add_argument("--overlap", type=int, default=None, help="frames shared by consecutive windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--png_dir", default=None, help="also write one preview PNG per frame here")
    ap.add_argument("--random_weights", action="store_true", help="no checkpoint: random model (smoke test)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)

    from moditalker.assets import default_path, missing_message

    inputs = (args.hubert, args.ref_lm3d, args.checkpoint, args.config)
    out = check_output(args.out, args.overwrite, inputs)
    if out.suffix != ".npy":
        raise UserError(f"--out must end in .npy, got {out}")
    check_output(out.with_suffix(".yaml"), args.overwrite, inputs)  # the run's config, written beside it
    if args.png_dir and Path(args.png_dir).exists() and not Path(args.png_dir).is_dir():
        raise UserError(f"--png_dir {args.png_dir} is a file, not a folder")
    hubert = load_npy(args.hubert, "HuBERT features")
    ref = load_npy(args.ref_lm3d, "reference landmark")
    if ref.ndim == 3:  # [T, 68, 3]: the frames of a landmark file, one of them the reference
        if args.ref_frame is None and ref.shape[0] != 1:
            raise UserError(
                f"{args.ref_lm3d} holds {ref.shape[0]} frames {tuple(ref.shape)}; pick one with --ref_frame K"
            )
        k = args.ref_frame or 0
        if not 0 <= k < ref.shape[0]:
            raise UserError(f"--ref_frame {k} is outside the {ref.shape[0]} frames of {args.ref_lm3d}")
        ref = ref[k]
    elif args.ref_frame is not None:
        raise UserError(f"--ref_frame takes a [T, 68, 3] --ref_lm3d; {args.ref_lm3d} is {tuple(ref.shape)}")
    bfm_dir = Path(args.bfm_dir) if args.bfm_dir else default_path("bfm_front").parent
    from data.face3d import Face3DHelper, write_synthetic_bfm

    if (bfm_dir / "BFM_model_front.mat").is_file():
        key_mean_shape = Face3DHelper(bfm_dir).key_mean_shape.cpu().numpy()
    elif args.random_weights and not args.bfm_dir:  # the synthetic face, as the pipeline's random mode
        with tempfile.TemporaryDirectory() as tmp:
            key_mean_shape = Face3DHelper(write_synthetic_bfm(tmp)).key_mean_shape.cpu().numpy()
        bfm_dir = Path("synthetic")
    else:
        raise UserError(missing_message("bfm_front", bfm_dir / "BFM_model_front.mat"))
    ckpt = None
    if not args.random_weights:
        ckpt = Path(args.checkpoint) if args.checkpoint else default_path("atom")
        if not ckpt.is_file():
            raise UserError(missing_message("atom", ckpt))
    diffusion = load_atom(
        ckpt, args.config, ema=args.ema, device=args.device, random_weights=args.random_weights
    )
    if args.random_weights:  # after every check: a refused run prints its one error line only
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr, flush=True)
    lm = generate_landmarks(
        diffusion,
        hubert,
        ref,
        key_mean_shape,
        steps=args.steps,
        eta=args.eta,
        guidance_weight=args.guidance,
        seed=args.seed,
        overlap=args.overlap,
    )
    save_npy(out, lm)
    run = OmegaConf.merge(
        diffusion.atom_config,
        {
            "inference": {
                **{
                    k: getattr(args, k)
                    for k in ("hubert", "ref_lm3d", "ref_frame", "out", "ema", "steps", "eta", "guidance")
                },
                **{k: getattr(args, k) for k in ("overlap", "seed", "device", "random_weights")},
                "checkpoint": str(ckpt) if ckpt else None,
                "bfm_dir": str(bfm_dir),
            }
        },
    )
    save_config(run, out.with_suffix(".yaml"))
    if args.png_dir:
        render_previews(lm, args.png_dir)
    print(f"wrote {out}: {lm.shape[0]} frames ({lm.shape[0] / 25:.2f} s at 25 fps)")


if __name__ == "__main__":
    cli_main(main)
