"""Benchmark of every inference stage: the original's call pattern ("faithful") against the fast path.

``python -m benchmarks.inference [--device cpu|cuda] [--seconds S] [--steps-scale F] [--json OUT.json]``
(also ``scripts/benchmark.sh``). Full-size networks with random weights (speed does not depend on
the values; the zero-initialised output layers of the UNet get small random weights so that the
outputs, and the comparisons between modes, mean something), S seconds of the bundled speech clip
and the moving reference face of :mod:`data.sample_data`. Stages, timed one after another:

* ``hubert``  HuBERT-large features of the audio (same code in every mode);
* ``atom``    AToM DDIM sampling of the frontal landmarks;
* ``align``   re-posing onto the reference frames, rendering the dot video, masking below the nose;
* ``mtov_encode`` / ``mtov_unet`` / ``mtov_decode``  MToV condition encodes, UNet steps, decode
  (their sum plus bookkeeping is ``mtov``); ``total`` is the sum of ``hubert``, ``atom``, ``align``
  and ``mtov``. ``hubert`` and ``align``, where a call takes under a second, run five times per mode
  and the fastest run counts (:data:`benchmarks.run.SHORT_REPEATS`).

Modes, run side by side in one process on the same inputs and the same noise:

* ``faithful``  the original's call pattern: two decoder passes per guided AToM step with the
  conditions re-encoded each time (``generate_landmarks(..., guidance_mode="original")``); one
  16-frame clip at a time with four encodes per clip (the target clip, whose latent is unused, the
  reference, the landmarks, the masked frames: :func:`MToV.generate.generate_video_original`); fp32,
  eager, explicit attention (PyTorch's math backend, as the original's einsum/bmm attention);
* ``fast``      the default path of :func:`AToM.inference.generate_landmarks` and
  :func:`MToV.generate.generate_video`: conditions encoded once, CFG as one batched pass on GPU (two
  passes on the CPU, which runs them faster), the reference
  latent once per video, only the encodes sampling uses, ``torch.inference_mode``, SDPA attention,
  clips batched, bf16 autocast for the autoencoders on GPUs and on the CPU the arithmetic measured
  faster there (``--precision auto``, :mod:`MToV.calibration`: int8 or bf16 only where it is at least
  1.15x faster than fp32; the report's ``precision_choice`` says what and why); on a GPU with
  ``--compile`` the UNet channels-last and compiled (:func:`MToV.loading.prepare_for_device`);
* ``fast_fp32`` the same fast path in full precision (it must equal ``faithful`` up to rounding).

With ``--steps-scale F < 1`` the samplers run ``F`` times their steps (quick runs); the per-stage
seconds, totals and speed-ups in the JSON are then extrapolated to the full step counts (the AToM
stage and the UNet time scale with the number of steps; everything else is measured as is), and the
raw measurements are kept under ``measured``.

``--cpu-isa avx2`` (x86-64 only) restarts the process with ATen, oneDNN, fbgemm and MKL capped at AVX2
(environment variables the libraries read when they load: :data:`moditalker.device.CPU_ISA_ENV`), i.e.
as on a CPU without AVX512, bf16 instructions or int8 dot products. MKL, which runs the fp32 matrix
products, obeys its cap on Intel CPUs only. The report's ``cpu_isa`` gives what the CPU arithmetic
could use.

Layout: :mod:`benchmarks.prepare` builds the networks and inputs, :mod:`benchmarks.run`
runs and times one mode; this module is the CLI and the report (extrapolation, speed-ups, table).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.options import set_threads, write_report
from benchmarks.prepare import Inputs, Networks, build_networks, make_inputs
from benchmarks.report import _device_name, busy_warnings, format_table
from benchmarks.run import (
    FULL_ATOM_STEPS,
    FULL_MTOV_SCHEDULE,
    MODES,
    STAGES,
    START_RATIO,
    ModeResult,
    mode_attention,
    run_mode,
    run_mtov,
)
from moditalker.device import CPU_ISA_ENV, allocator, cpu_isa_missing, cpu_isa_report
from moditalker.errors import UserError, cli_main, script_prog
from MToV.generate import SamplingOptions
from MToV.loading import PRECISIONS, PrecisionPlan

__all__ = [
    "MODES",
    "STAGES",
    "build_parser",
    "check_settings",
    "extrapolate",
    "format_table",
    "main",
    "mtov_unet_passes",
    "psnr",
    "run_benchmark",
]


def mtov_unet_passes(sampling_timesteps: int, start_ratio: float = START_RATIO, timesteps: int = 1000) -> int:
    """UNet evaluations per clip of the noised-start DDIM (25 for the official 100 steps at 0.25):
    :func:`MToV.generate.denoising_steps` with the benchmark's start ratio."""
    from MToV.generate import denoising_steps

    return denoising_steps(start_ratio, sampling_timesteps, timesteps)


def extrapolate(sec: dict[str, float], atom_factor: float, unet_factor: float) -> dict[str, float]:
    """Seconds at full steps: the AToM stage and the UNet time scaled, everything else as measured."""
    out = dict(sec)
    out["atom"] = sec["atom"] * atom_factor
    out["mtov_unet"] = sec["mtov_unet"] * unet_factor
    out["mtov"] = sec["mtov"] + out["mtov_unet"] - sec["mtov_unet"]
    out["total"] = sec["total"] + (out["atom"] - sec["atom"]) + (out["mtov_unet"] - sec["mtov_unet"])
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8-quantised frames (inputs in [-1, 1]); inf when identical."""
    qa = np.round((np.asarray(a, np.float64) + 1) * 127.5).clip(0, 255)
    qb = np.round((np.asarray(b, np.float64) + 1) * 127.5).clip(0, 255)
    mse = float(np.mean((qa - qb) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def check_settings(
    seconds: float, steps_scale: float, modes: Sequence[str], batch_size: int | None, seed: int
) -> None:
    """One-line errors for settings the benchmark cannot run with (before any network is built)."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"--seconds must be a positive number, got {seconds}")
    if not math.isfinite(steps_scale) or not 0 < steps_scale <= 1:
        raise UserError(f"--steps-scale must be in (0, 1], got {steps_scale}")
    if not modes:
        raise UserError(f"--modes names no mode; use a comma list of {', '.join(MODES)}")
    for m in modes:
        if m not in MODES:
            raise UserError(f"unknown mode {m!r}; use a comma list of {', '.join(MODES)}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be in 0..2**32-1, got {seed}")


def run_benchmark(
    device: str = "auto",
    seconds: float = 4.0,
    steps_scale: float = 1.0,
    modes: Sequence[str] = ("fast", "fast_fp32", "faithful"),
    precision: str = "auto",
    batch_size: int | None = None,
    compile: bool = False,
    tiny: bool = False,
    seed: int = 0,
    progress: bool = True,
    log=print,
    clock: str = "wall",
    still: bool = False,
    calibration_file: str | None = None,
    recalibrate: bool = False,
    warmup: bool = True,
) -> dict[str, Any]:
    """Build the networks, run every mode on the same inputs and return the report dict (see module doc).

    ``precision`` ``auto`` on the CPU is resolved first by :func:`MToV.calibration.resolve_plan`
    (``calibration_file``, ``recalibrate``: where the measurement is kept, measure again); the report's
    ``precision_choice`` says what was chosen and why. ``warmup`` runs HuBERT and one AToM step of
    each guidance pattern before any mode (not timed, :func:`warm_up`), so the first mode does not pay
    the process's first calls.
    """
    from moditalker.device import resolve_device
    from MToV.calibration import resolve_plan
    from MToV.loading import prepare_for_device, undo_prepare

    if clock not in ("wall", "cpu"):
        raise UserError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    check_settings(seconds, steps_scale, modes, batch_size, seed)
    dev = resolve_device(device)
    if batch_size is None:
        batch_size = 4
    t0 = time.perf_counter()
    nets = build_networks(dev, tiny=tiny, seed=seed)
    load_seconds = time.perf_counter() - t0
    size = nets.mtov.resolution
    inputs = make_inputs(seconds, size=size, seed=seed, still=still)
    full_atom = FULL_ATOM_STEPS
    atom_steps = max(1, int(round(full_atom * steps_scale)))
    mtov_steps = max(4, int(round(FULL_MTOV_SCHEDULE * steps_scale)))
    full_passes = mtov_unet_passes(FULL_MTOV_SCHEDULE)
    passes = mtov_unet_passes(mtov_steps)
    choice = None
    if "fast" in modes:  # auto on the CPU: measured (or read back), before any mode and not timed
        choice = resolve_plan(
            precision, nets.mtov, dev, cache_file=calibration_file, recalibrate=recalibrate, log=log
        )
    plan = choice.plan if choice is not None else None
    prepare_seconds = None
    if plan is not None:  # int8 copies of the networks: made once per loaded model, like the loading
        t0 = time.perf_counter()
        nets.mtov.autoencoders(plan), nets.mtov.unet_for(plan)
        prepare_seconds = round(time.perf_counter() - t0, 2)
    log(
        f"device {dev}, {torch.get_num_threads()} CPU threads; {'tiny' if tiny else 'full-size'} random "
        f"networks built in {load_seconds:.1f} s; {inputs.n_frames} frames ({seconds:g} s); "
        f"AToM {atom_steps}/{full_atom} steps, MToV {passes}/{full_passes} UNet passes per clip; "
        + (f"fast path: {plan_text(plan)} ({choice.source})" if plan is not None else "no fast mode")
    )
    warmup_seconds = None
    if warmup:
        t0 = time.perf_counter()
        warm_up(nets, inputs, seed=seed)
        warmup_seconds = round(time.perf_counter() - t0, 2)
        log(f"warm-up (HuBERT and AToM once, both guidance patterns; not timed): {warmup_seconds:.1f} s")
    results: dict[str, ModeResult] = {}
    gpu = dev.type == "cuda"
    for mode in modes:
        sampling = SamplingOptions(
            batch_size=batch_size,
            seed=seed,
            start_ratio=START_RATIO,
            sampling_timesteps=mtov_steps,
            precision=plan if mode == "fast" else "fp32",
        )
        if compile and mode == "faithful":  # the original's eager UNet, whichever mode ran before
            undo_prepare(nets.mtov)
        elif compile:  # the fast modes: the UNet compiled (GPU)
            prepare_for_device(nets.mtov, compile=True)
        if gpu and (warmup or compile):
            # untimed: the first calls load the kernels and, compiled, build a graph per UNet batch shape
            t0 = time.perf_counter()
            warm_up_mtov(nets, inputs.n_frames, sampling, faithful=mode == "faithful")
            log(f"MToV warm-up of the {mode} mode (not timed): {time.perf_counter() - t0:.1f} s")
        log(f"--- {mode}")
        res = run_mode(
            mode,
            nets,
            inputs,
            atom_steps=atom_steps,
            sampling=sampling,
            progress=progress,
            clock_kind=clock,
        )
        results[mode] = res
        log("    " + ", ".join(f"{k} {v:.2f} s" for k, v in res.seconds.items()))
    atom_factor, unet_factor = full_atom / atom_steps, full_passes / passes
    report: dict[str, Any] = {
        "device": _device_name(dev),
        "seconds_of_video": float(seconds),
        "frames": inputs.n_frames,
        "reference": "still" if still else "moving",
        "threads": torch.get_num_threads(),
        "allocator": allocator(),
        # the instructions the CPU arithmetic could use (--cpu-isa caps them to emulate a smaller CPU)
        "cpu_isa": cpu_isa_report() if dev.type == "cpu" else None,
        "networks": "tiny" if tiny else "full-size, random weights",
        "steps_scale": steps_scale,
        "steps": {
            "atom": atom_steps,
            "atom_full": full_atom,
            "mtov_unet_passes": passes,
            "mtov_unet_passes_full": full_passes,
        },  # fmt: skip
        "precision": precision,
        "autoencoder_dtype": str((plan or PrecisionPlan("fp32")).autoencoder_dtype).replace("torch.", ""),
        # the arithmetic of each MToV network per mode (the faithful mode is the original's: fp32)
        "precision_used": {
            m: (plan if m == "fast" else PrecisionPlan("fp32")).per_network() for m in results
        },
        # what the fast mode's arithmetic is and why: measured on this CPU, read back, a rule, or given
        "precision_choice": choice.report() if choice is not None else None,
        "warmup_seconds": warmup_seconds,
        # the fast plan's int8 copies of the networks (quantising), made once before the modes, not timed
        "prepare_seconds": prepare_seconds,
        # building (here: random initialisation) of every network, once, before any mode; the modes'
        # seconds below never include it (a real run adds its checkpoint loading once per process)
        "load_seconds": round(load_seconds, 2),
        "batch_size": batch_size,
        "compile": compile,
        "clock": "process CPU seconds (all threads)" if clock == "cpu" else "wall seconds",
    }
    for mode, res in results.items():
        report[mode] = extrapolate(res.seconds, atom_factor, unet_factor)
    report["measured"] = {mode: res.seconds for mode, res in results.items()}
    report["measured_cpu_seconds"] = {mode: res.cpu_seconds for mode, res in results.items()}
    report["seconds_per_second_of_video"] = {m: report[m]["total"] / seconds for m in results}
    report["peak_memory_mb"] = {m: round(r.peak_memory_bytes / 2**20, 1) for m, r in results.items()}
    report["memory_kind"] = "allocated (CUDA)" if dev.type == "cuda" else "resident set (RSS, whole process)"
    faithful = results.get("faithful")
    for mode, key in (("fast", "speedup_total"), ("fast_fp32", "speedup_total_fp32")):
        report[key] = (
            (report["faithful"]["total"] / report[mode]["total"]) if faithful and mode in results else None
        )
    if faithful and "fast" in results:
        report["speedup_by_stage"] = {
            s: report["faithful"][s] / report["fast"][s] for s in STAGES if report["fast"][s] > 0
        }
    if faithful and "fast_fp32" in results:
        fp32 = results["fast_fp32"]
        report["max_abs_diff_fp32"] = float(np.abs(fp32.frames - faithful.frames).max())
        report["max_abs_diff_fp32_landmarks"] = float(np.abs(fp32.landmarks - faithful.landmarks).max())
    else:
        report["max_abs_diff_fp32"] = None
    report["psnr_db"] = (
        psnr(results["fast"].frames, faithful.frames) if faithful and "fast" in results else None
    )
    both = "fast" in results and "fast_fp32" in results  # the cheaper arithmetic alone, without faithful
    report["psnr_db_fast_vs_fp32"] = (
        psnr(results["fast"].frames, results["fast_fp32"].frames) if both else None
    )
    report["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    report["busy_warnings"] = busy_warnings(report, dev)
    return report


def plan_text(plan: PrecisionPlan) -> str:
    return f"autoencoders {plan.autoencoders}, UNet {plan.unet}"


def warm_up(nets: Networks, inputs: Inputs, seed: int = 0) -> None:
    """HuBERT on the audio and one AToM step in the fast and the original guidance pattern, not timed:
    a process's first calls of a network pay one-time costs (thread pool, kernels set up for each new
    input shape, first touch of the weights), which would otherwise fall on whichever mode runs first.
    The same shapes as the timed runs: HuBERT's whole input, AToM's window (always ``horizon`` frames)."""
    from AToM.inference import generate_landmarks

    gpu = nets.mtov.device.type != "cpu"
    for mode in ("auto", "original"):  # as the modes run them: the faithful one in math attention
        with sdpa_kernel(SDPBackend.MATH) if mode == "original" else contextlib.nullcontext():
            if mode == "auto" or gpu:  # on the CPU HuBERT takes the math attention in every mode
                hub = nets.hubert(inputs.wave, name="warm-up")
            generate_landmarks(
                nets.atom, hub, inputs.ref_lm3d[0], inputs.key_mean, steps=1, seed=seed, progress=False,
                guidance_mode=mode,
            )  # fmt: skip


def warm_up_mtov(nets: Networks, n_frames: int, sampling: SamplingOptions, faithful: bool = False) -> None:
    """MToV once on random frames of the benchmark's length as a mode runs it (``faithful``:
    :func:`MToV.generate.generate_video_original`, else :func:`MToV.generate.generate_video` in the
    arithmetic of ``sampling``), with the fewest DDIM steps that run the UNet: the same batches, shapes
    and strides as the timed run, so the CUDA kernels are loaded and a compiled UNet is compiled for
    every batch shape before the timing."""
    from MToV.generate import denoising_steps

    steps = next(s for s in range(1, FULL_MTOV_SCHEDULE + 1) if denoising_steps(sampling.start_ratio, s))
    size = nets.mtov.resolution
    frames = np.random.default_rng(0).integers(0, 256, (n_frames, 3, size, size), dtype=np.uint8)
    quick = dataclasses.replace(sampling, sampling_timesteps=steps)
    masked = np.ascontiguousarray(frames[::-1])
    mode = "faithful" if faithful else "fast"  # (fast_fp32: ``sampling`` is fp32 already)
    with mode_attention(mode):
        run_mtov(mode, nets.mtov, frames, masked, frames[0], frames, quick, progress=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=script_prog("python -m benchmarks.inference"),
        description="Time every inference stage: original call pattern vs fast path (random weights).",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N [auto]")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of video to generate [4]")
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="fraction of the diffusion steps to run (quick runs); times are extrapolated to full steps [1]",
    )
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="arithmetic of the fast mode: auto = bf16 autoencoders on GPUs; on the CPU what was measured "
        ">= 1.15x faster than fp32 on this machine (int8/bf16 autoencoders, int8 UNet), else fp32 "
        "(see mtov.precision)",
    )
    p.add_argument(
        "--modes", default="fast,fast_fp32,faithful", help="comma list of faithful, fast, fast_fp32 [all]"
    )
    p.add_argument("--batch-size", type=int, default=None, help="MToV clips per batch on the fast path [4]")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet on the fast path (GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--tiny", action="store_true", help="tiny test configs instead of the full-size networks")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall seconds, or process CPU seconds (steadier on a busy machine; with --threads 1) [wall]",
    )
    p.add_argument(
        "--still", action="store_true", help="a still reference (one frame held, as --ref_image) [moving]"
    )
    p.add_argument(
        "--cpu-isa",
        choices=("native", *CPU_ISA_ENV),
        default="native",
        help="run as on an x86-64 CPU with only these instructions (avx2: no AVX512, bf16 or int8 dot "
        "products): restarts the process with ATen, oneDNN, fbgemm and MKL capped (MKL obeys on Intel "
        "CPUs only) [native]",
    )
    p.add_argument(
        "--calibration-file",
        default=None,
        help="JSON file keeping what --precision auto measured on this CPU "
        "[$MODITALKER_CACHE_DIR, else $XDG_CACHE_HOME/moditalker, else ~/.cache/moditalker: "
        "precision_calibration.json]",
    )
    p.add_argument(
        "--recalibrate", action="store_true", help="time the precisions again for --precision auto (CPU)"
    )
    p.add_argument(
        "--no-warmup", action="store_true", help="no untimed HuBERT/AToM call before the first mode"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    missing = cpu_isa_missing(args.cpu_isa)
    if args.cpu_isa != "native" and platform.machine().lower() not in ("x86_64", "amd64"):
        raise UserError(
            f"--cpu-isa {args.cpu_isa} caps x86-64 instruction sets; this is {platform.machine()}"
        )
    if missing:  # the libraries read these when they load: only a new process can take them
        if argv is not None:
            raise UserError(
                f"--cpu-isa {args.cpu_isa} needs {' '.join(f'{k}={v}' for k, v in missing.items())} "
                "set before the process starts (the command line sets them itself)"
            )
        sys.stdout.flush(), sys.stderr.flush()
        os.execve(
            sys.executable,
            [sys.executable, "-m", "benchmarks.inference", *sys.argv[1:]],
            {**os.environ, **missing},
        )
    set_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    check_settings(args.seconds, args.steps_scale, modes, args.batch_size, args.seed)
    out = None
    if args.json:
        from moditalker.fileio import check_output

        out = check_output(args.json, overwrite=args.overwrite)  # before any work
    report = run_benchmark(
        device=args.device,
        seconds=args.seconds,
        steps_scale=args.steps_scale,
        modes=modes,
        precision=args.precision,
        batch_size=args.batch_size,
        compile=args.compile,
        tiny=args.tiny,
        seed=args.seed,
        progress=not args.no_progress,
        clock=args.clock,
        still=args.still,
        calibration_file=args.calibration_file,
        recalibrate=args.recalibrate,
        warmup=not args.no_warmup,
    )
    print(format_table(report), flush=True)
    if out is not None:
        write_report(str(out), _finite(report), indent=2)
        print(f"wrote {out}")
    return report


def _finite(v: Any) -> Any:
    """Strict JSON: infinite floats (PSNR of identical frames) become the string "inf"."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return v


if __name__ == "__main__":
    cli_main(main)
