"""The benchmark's report as text (:mod:`benchmarks.inference`): the device named, signs that other jobs
shared the machine, and the table of seconds per stage and mode, speed-ups and quality."""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.run import MODES, STAGES


def busy_warnings(report: dict[str, Any], device: torch.device) -> list[str]:
    """Signs that another job shared the machine, so the seconds and ratios are not sound: this
    process got a small share of its threads' time (wall clock far above CPU time), the load average
    exceeds the cores, or the fast path came out slower than the original's call pattern."""
    out = []
    if device.type == "cpu" and report["clock"] == "wall seconds":
        threads = max(1, int(report["threads"]))
        for mode in MODES:
            wall = report.get("measured", {}).get(mode, {}).get("total")
            cpu = report.get("measured_cpu_seconds", {}).get(mode, {}).get("total")
            if wall and cpu is not None and cpu / (wall * threads) < 0.35:
                out.append(
                    f"{mode}: CPU time {cpu:.1f} s in {wall:.1f} s of wall time on {threads} threads "
                    f"({cpu / (wall * threads):.0%} of them): the process was waiting for the CPU"
                )
    load, cores = report.get("load_average"), os.cpu_count() or 1
    if device.type == "cpu" and load is not None and load > cores + 1:
        out.append(f"load average {load:.1f} on {cores} cores at the end: other jobs were running")
    for key in ("speedup_total", "speedup_total_fp32"):
        if report.get(key) is not None and report[key] < 1.0:
            out.append(f"{key} {report[key]:.2f}x < 1: the fast path cannot be slower than the original's")
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    name = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table: seconds per stage and mode, speed-ups, quality."""
    modes = [m for m in MODES if m in report]
    extrapolated = " (seconds extrapolated to full steps)" if report["steps_scale"] < 1 else ""
    header = f"{'stage':<12}" + "".join(f"{m:>12}" for m in modes)
    if "speedup_by_stage" in report:
        header += "   faithful/fast"
    lines = [
        f"device: {report['device']}; {report['seconds_of_video']:g} s of video ({report['frames']} frames); "
        f"steps scale {report['steps_scale']:g}{extrapolated}; {report['clock']}; "
        f"allocator {report.get('allocator', 'default')}",
        header,
    ]
    for s in STAGES:
        row = f"{s:<12}" + "".join(f"{report[m][s]:>11.2f}s" for m in modes)
        if "speedup_by_stage" in report and s in report["speedup_by_stage"]:
            row += f"   {report['speedup_by_stage'][s]:>8.2f}x"
        lines.append(row)
    lines.append(
        f"{'s per s':<12}" + "".join(f"{report['seconds_per_second_of_video'][m]:>12.2f}" for m in modes)
    )
    lines.append(f"{'peak MB':<12}" + "".join(f"{report['peak_memory_mb'][m]:>12.0f}" for m in modes))

    def fmt(v: Any, spec: str, unit: str = "") -> str:
        return "n/a" if v is None else format(v, spec) + unit

    lines.append(
        f"speedup_total {fmt(report['speedup_total'], '.2f', 'x')} "
        f"(fast, {report['precision_used'].get('fast', {}).get('ae_rgb', '-')} autoencoders), "
        f"speedup_total_fp32 {fmt(report['speedup_total_fp32'], '.2f', 'x')}, "
        f"max_abs_diff_fp32 {fmt(report['max_abs_diff_fp32'], '.2e')}, "
        f"psnr_db {fmt(report['psnr_db'], '.1f')}, "
        f"psnr_db_fast_vs_fp32 {fmt(report.get('psnr_db_fast_vs_fp32'), '.1f')}"
    )
    used = report.get("precision_used", {}).get("fast")
    if used:
        lines.append("precision_used (fast): " + ", ".join(f"{k} {v}" for k, v in used.items()))
    choice = report.get("precision_choice")
    if choice:
        lines.append(f"precision choice ({choice['source']}): {choice['reason']}")
    isa = report.get("cpu_isa")
    if isa:
        lines.append(
            f"cpu: ATen {isa['aten']}, oneDNN {isa['onednn_max_isa']}, fbgemm {isa['fbgemm']}, "
            f"MKL {isa['mkl_instructions']}; bf16 {isa['bf16']}, AMX bf16 {isa['amx_bf16']}, "
            f"int8 dot products {isa['int8_dot_products']}"
        )
    for warning in report.get("busy_warnings") or ():
        lines.append(
            f"WARNING (busy machine, figures unsound; re-run when idle or with --clock cpu): {warning}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
