"""Does training learn? Train every stage small on the synthetic world (:mod:`data.synthetic`) and score
it on held-out sentences whose right answers are known.

``python -m benchmarks.learning --out DIR [--seed S] [--json OUT] [--device cpu|cuda]`` (also
``scripts/benchmark_learning.sh``):

1. the world: ``--train`` training and ``--heldout`` held-out sentences of the bundled face, 64x64
   frames (``python -m data.synthetic``);
2. training with the project's own commands (``scripts/train_atom.sh``, ``scripts/train_mtov_ae.sh``,
   ``scripts/train_mtov_ae_ldmk.sh``, ``scripts/cache_mtov_latents.sh``, ``scripts/train_mtov_diffusion.sh``
   with ``configs/atom_learning.yaml``, ``configs/mtov_autoencoder_learning.yaml`` and
   ``configs/mtov_learning.yaml``; both autoencoders with ``loss.latent_weight`` (unbounded, their tanh
   latents saturate and the UNet cannot follow the landmarks), the landmark one from scratch
   (``freeze_decoder=false``) with ``loss.foreground_weight`` (plain L1 on sparse dots learns black
   frames), landmark dots of radius 1; the UNet from the latent cache);
3. on the held-out sentences:

   * **AToM** through :func:`AToM.inference.generate_landmarks` (the pipeline's call, the clip's first
     true landmark as the reference): Pearson correlation of the generated mouth opening (inner-lip
     gap) with the true opening over all frames, trained and untrained (the same network at its
     seeded initialisation);
   * **MToV** through :func:`MToV.generate.generate_video` (fp32) driven by the true landmarks (rendered
     by :func:`data.motion_align.render_landmarks`), the clip's own frames masked below the nose (the
     self-reconstruction protocol): PSNR in the fixed lip box and over the whole frame against the
     true frames, and the same for copying the reference (first) frame; at 25, 10 and 5 UNet passes;
     and the control: driven by another held-out sentence's landmarks, the mouth must come out worse
     (``mtov_follows_landmarks``: without it, a beaten reference copy may be only an average mouth),
     and (reported, not scored) how the generated mouth's darkness follows the true opening with the own
     landmarks and with the other's;
     and what each autoencoder's latent holds (:func:`latent_report`);
   * **end to end**, audio in: AToM's landmarks projected into the photo (the world's own projection,
     standing in for the pipeline's pose alignment) drive MToV with the still photo as the reference;
     the correlation of the generated mouth's darkness with the true opening (the smoothed, delayed
     loudness), next to the same figure for the true frames (its ceiling).

Writes ``--json`` (``atom``, ``mtov``, ``end_to_end``, ``cpu_minutes``, ``seed``, ``device``, ...) and
prints a table. Rerunning with the same ``--out`` resumes (each trainer continues from its own state,
up to the new step count); other autoencoder settings need a new ``--out`` (the latent cache refuses
autoencoders that changed since it was built). ``cpu_minutes`` and ``wall_minutes`` are this
invocation's: after a resume they count only the training it did (``resumed`` says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.learning_scores import (
    atom_mouth_corr,
    end_to_end_scores,
    latent_report,
    mouth_darkness,
    mtov_scores,
    psnr,
    read_clip,
    sample_clip,
)
from benchmarks.options import check_common, write_report
from moditalker.errors import UserError, cli_main, script_prog

REPO = Path(__file__).resolve().parents[1]
ATOM_CONFIG = "configs/atom_learning.yaml"
AE_CONFIG = "configs/mtov_autoencoder_learning.yaml"
MTOV_CONFIG = "configs/mtov_learning.yaml"
PASSES = {25: 100, 10: 40, 5: 20}  # UNet passes per clip -> sampling_timesteps at start_ratio 0.25
TARGETS = {"mouth_corr_trained": 0.7, "mouth_corr_untrained": 0.3, "mouth_psnr_margin_db": 2.0}
FOLLOW_MARGIN_DB = 0.5  # own landmarks over another sentence's, lip box (as tests/test_learning.py)
LDMK_FOREGROUND = 5.0  # the landmark autoencoder's L1 weight on the lit (dot) pixels

__all__ = [
    "PASSES",
    "TARGETS",
    "atom_mouth_corr",
    "format_table",
    "latent_report",
    "main",
    "mouth_darkness",
    "mtov_scores",
    "psnr",
    "read_clip",
    "run_benchmark",
    "sample_clip",
]


# ------------------------------------------------------------------------------------------------
# the run


def _run(script: str, args: Sequence[str], env_extra: dict[str, str], log: Path, threads: int | None) -> None:
    """One of the project's scripts, with this Python; its output goes to ``log``; error on failure."""
    env = {**os.environ, "PYTHON": sys.executable, **env_extra}
    if threads is not None:  # the children use as many threads as this process was given
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = ["bash", str(REPO / "scripts" / script), *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(f"{k}={v}" for k, v in env_extra.items()) + " " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-5:]
        raise UserError(f"{script} failed (exit {rc}); see {log}: " + " | ".join(tail))


def _last_atom_checkpoint(folder: Path) -> Path:
    ckpts = sorted((folder / "checkpoints").glob("step_*.pt"))
    if not ckpts:
        raise UserError(f"AToM training wrote no checkpoint in {folder}")
    return ckpts[-1]


def run_benchmark(
    out: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    n_train: int = 96,
    n_heldout: int = 8,
    n_render: int = 16,
    atom_steps: int = 3000,
    ae_steps: int = 1500,
    ldmk_steps: int = 500,
    unet_steps: int = 4000,
    cache_stride: int = 4,
    passes: Sequence[int] = (25, 10, 5),
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Build the world, train every stage, score it (see the module doc); returns the report.
    ``threads``: the CPU threads of every training stage (None: the libraries' default)."""
    import torch

    from AToM.inference import load_atom
    from data.synthetic import write_world
    from moditalker.config import load_config
    from moditalker.device import resolve_device
    from MToV.conditions import condition_settings
    from MToV.loading import MODEL_DEFAULTS, load_mtov

    t0 = time.time()
    dev = resolve_device(device)
    out = Path(out).resolve()  # the trainers run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    world_dir = out / "world"
    # a stage's folder from an earlier invocation: its trainer resumes there
    resumed = any((out / d).exists() for d in ("atom", "ae_rgb", "ae_ldmk", "latents", "unet"))
    if (world_dir / "world.json").is_file():
        world = json.loads((world_dir / "world.json").read_text())
    else:
        print("building the synthetic world ...", flush=True)
        world = write_world(
            world_dir, seed=seed, n_train=n_train, n_heldout=n_heldout, n_render=n_render, size=64,
            progress=progress,
        )  # fmt: skip
    hdtf = world_dir / "hdtf"
    split = f"data.split_file={hdtf / 'heldout_ids.txt'}"
    quiet = [] if progress else ["--no_progress"]
    common = ["--device", str(dev), *quiet]
    stages = [
        ("AToM", "train_atom.sh", {"CONFIG": ATOM_CONFIG},
         [*common, "--out_dir", str(out / "atom"), f"data.root={world_dir / 'atom'}",
          f"train.max_steps={atom_steps}", f"train.seed={seed}"]),
        ("RGB autoencoder", "train_mtov_ae.sh", {"CONFIG": AE_CONFIG},
         [*common, "--out_dir", str(out / "ae_rgb"), f"data.root={hdtf}", split,
          f"train.max_steps={ae_steps}", f"train.seed={seed}"]),
        ("landmark autoencoder", "train_mtov_ae_ldmk.sh", {"CONFIG": AE_CONFIG},
         [*common, "--out_dir", str(out / "ae_ldmk"), "freeze_decoder=false",
          f"loss.foreground_weight={LDMK_FOREGROUND}", f"data.root={hdtf}", split,
          f"train.max_steps={ldmk_steps}", f"train.seed={seed}"]),
        ("latent cache", "cache_mtov_latents.sh", {"CONFIG": MTOV_CONFIG},
         [*common, "--ae_rgb", str(out / "ae_rgb" / "model_last.pth"), "--ae_ldmk",
          str(out / "ae_ldmk" / "model_last.pth"), f"data.root={hdtf}", split,
          "--stride", str(cache_stride), "--out", str(out / "latents")]),
        ("diffusion UNet", "train_mtov_diffusion.sh", {"CONFIG": MTOV_CONFIG},
         [*common, "--ae_rgb", str(out / "ae_rgb" / "model_last.pth"), "--ae_ldmk",
          str(out / "ae_ldmk" / "model_last.pth"), "--out_dir", str(out / "unet"),
          f"data.latents={out / 'latents'}", split, f"train.max_steps={unet_steps}", f"train.seed={seed}"]),
    ]  # fmt: skip
    times = {}
    for name, script, env, args in stages:
        print(f"training: {name} ({script}; log {log})", flush=True)
        s = time.time()
        _run(script, args, env, log, threads)
        times[name] = round(time.time() - s, 1)

    print("scoring on the held-out sentences ...", flush=True)
    with torch.random.fork_rng(devices=[]):
        trained = load_atom(_last_atom_checkpoint(out / "atom"), device=dev)
        untrained = load_atom(None, trained.atom_config, device=dev, random_weights=True)
        atom = {
            "mouth_corr_trained": atom_mouth_corr(trained, world_dir, world["heldout_ids"], seed),
            "mouth_corr_untrained": atom_mouth_corr(untrained, world_dir, world["heldout_ids"], seed),
        }
        cfg = load_config(REPO / MTOV_CONFIG, [], MODEL_DEFAULTS)
        models = load_mtov(
            str(out / "ae_rgb" / "model_last.pth"),
            str(out / "ae_ldmk" / "model_last.pth"),
            str(out / "unet" / "diffusion_model.pth"),
            cfg,
            dev,
        )
        mtov = mtov_scores(models, world, hdtf, {p: PASSES[p] for p in passes}, seed)
        radius = condition_settings(models)[1]
        mtov["latents"] = {
            "rgb": latent_report(models.ae_rgb, world, hdtf, "rgb", radius),
            "ldmk": latent_report(models.ae_ldmk, world, hdtf, "ldmk", radius),
        }
        end_to_end = end_to_end_scores(trained, models, world, world_dir, seed)
    usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = sum(u.ru_utime + u.ru_stime for u in usage)
    report = {
        "atom": atom,
        "mtov": mtov,
        "end_to_end": end_to_end,
        "cpu_minutes": round(cpu_s / 60, 2),
        "wall_minutes": round((time.time() - t0) / 60, 2),
        "resumed": resumed,
        "stage_seconds": times,
        "seed": seed,
        "device": str(dev),
        "cpu": _cpu_name(),
        "steps": {"atom": atom_steps, "ae_rgb": ae_steps, "ae_ldmk": ldmk_steps, "unet": unet_steps},
        "cache_stride": cache_stride,
        "world": {
            "train": len(world["train_ids"]),
            "heldout": len(world["heldout_ids"]),
            "rendered_train": sum(c["rendered"] and c["split"] == "train" for c in world["clips"].values()),
            "size": world["size"],
            "hubert_loudness_r2": world["hubert_loudness_r2"],
        },
    }
    report["targets_met"] = targets_met(report)
    return report


def _fewest_passes(mtov: dict) -> str:
    """The key of the fewest UNet passes in the report's ``passes`` table (where the control ran)."""
    return str(min(int(p) for p in mtov["passes"]))


def targets_met(report: dict) -> dict:
    a, m = report["atom"], report["mtov"]
    return {
        "atom": a["mouth_corr_trained"] >= TARGETS["mouth_corr_trained"]
        and a["mouth_corr_untrained"] <= TARGETS["mouth_corr_untrained"],
        "mtov": m["mouth_psnr_heldout"] >= m["mouth_psnr_reference_copy"] + TARGETS["mouth_psnr_margin_db"],
        # not a target of the benchmark's brief, but without it a beaten reference copy proves nothing:
        # the own landmarks must give a better mouth than another sentence's (at the fewest passes)
        "mtov_follows_landmarks": m["passes"][_fewest_passes(m)]["mouth_psnr"]
        >= m["mouth_psnr_wrong_landmarks"] + FOLLOW_MARGIN_DB,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"unknown CPU ({os.cpu_count()} cores)"


def format_table(r: dict) -> str:
    a, m, e = r["atom"], r["mtov"], r["end_to_end"]
    few = _fewest_passes(m)
    lines = [
        f"learning benchmark, seed {r['seed']}, {r['device']} ({r['cpu']}): "
        f"{r['cpu_minutes']} CPU min, {r['wall_minutes']} min wall"
        + (" (this invocation, resumed: earlier training not counted)" if r.get("resumed") else ""),
        "",
        "| stage | measure | trained | baseline | target |",
        "| --- | --- | ---: | ---: | --- |",
        f"| AToM | mouth opening corr (held-out) | {a['mouth_corr_trained']:.3f} | "
        f"{a['mouth_corr_untrained']:.3f} (untrained) | >= 0.7, untrained <= 0.3 |",
        f"| MToV | mouth-box PSNR dB | {m['mouth_psnr_heldout']:.2f} | "
        f"{m['mouth_psnr_reference_copy']:.2f} (reference copy) | >= copy + 2 dB |",
        f"| MToV | whole-frame PSNR dB | {m['psnr_heldout']:.2f} | {m['psnr_reference_copy']:.2f} "
        "(reference copy) | |",
        f"| MToV | mouth-box PSNR dB, {few} passes | {m['passes'][few]['mouth_psnr']:.2f} | "
        f"{m['mouth_psnr_wrong_landmarks']:.2f} (another sentence's landmarks) | own >= wrong + "
        f"{FOLLOW_MARGIN_DB} dB |",
        f"| MToV | mouth darkness corr, {few} passes | "
        f"{m['mouth_dark_corr']:.3f} | {m['mouth_dark_corr_wrong_landmarks']:.3f} (another sentence's "
        "landmarks) | |",
        f"| end to end | mouth darkness corr | {e['mouth_dark_corr']:.3f} | "
        f"{e['mouth_dark_corr_true_frames']:.3f} (true frames) | |",
        "",
        "| UNet passes per clip | mouth-box PSNR dB | whole-frame PSNR dB |",
        "| ---: | ---: | ---: |",
    ]
    for p, v in sorted(m["passes"].items(), key=lambda kv: -int(kv[0])):
        lines.append(f"| {p} | {v['mouth_psnr']:.2f} | {v['psnr']:.2f} |")
    if "latents" in m:
        lines += [
            "",
            "| autoencoder latent | saturated (> 0.99) | spread over windows | opening R^2 (held-out) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, v in m["latents"].items():
            spread = "-" if v["spread"] is None else f"{v['spread']:.4f}"  # None: one window
            lines.append(f"| {name} | {v['saturated']:.2f} | {spread} | {v['opening_r2']:.3f} |")
    t = r["targets_met"]
    lines += [
        "",
        f"targets: AToM {'met' if t['atom'] else 'NOT met'}, MToV {'met' if t['mtov'] else 'NOT met'}; "
        f"MToV {'follows' if t['mtov_follows_landmarks'] else 'does NOT follow'} its landmarks",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=script_prog("python -m benchmarks.learning"),
        description="Train every stage small on the synthetic world and score it on held-out sentences.",
    )
    p.add_argument("--out", default="runs/benchmark_learning", help="work folder (world, runs, logs)")
    p.add_argument("--seed", type=int, default=0, help="world and training seed [0]")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N [cpu]")
    p.add_argument("--train", type=int, default=96, help="training sentences [96]")
    p.add_argument("--heldout", type=int, default=8, help="held-out sentences [8]")
    p.add_argument("--render", type=int, default=16, help="training sentences rendered for MToV [16]")
    p.add_argument("--atom_steps", type=int, default=3000)
    p.add_argument("--ae_steps", type=int, default=1500, help="RGB autoencoder steps [1500]")
    p.add_argument("--ldmk_steps", type=int, default=500, help="landmark AE steps (from scratch) [500]")
    p.add_argument("--unet_steps", type=int, default=4000, help="UNet steps (from the latent cache) [4000]")
    p.add_argument("--cache_stride", type=int, default=4, help="latent cache: every S-th window start [4]")
    p.add_argument("--passes", type=int, nargs="+", default=[25, 10, 5], choices=sorted(PASSES))
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of every stage (on a CPU shared with other jobs 1 avoids oversubscription)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_common(args)
    report = run_benchmark(
        args.out,
        seed=args.seed,
        device=args.device,
        n_train=args.train,
        n_heldout=args.heldout,
        n_render=args.render,
        atom_steps=args.atom_steps,
        ae_steps=args.ae_steps,
        ldmk_steps=args.ldmk_steps,
        unet_steps=args.unet_steps,
        cache_stride=args.cache_stride,
        passes=args.passes,
        progress=not args.no_progress,
        threads=args.threads,
    )
    print(format_table(report))
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    cli_main(main)
