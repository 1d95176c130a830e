"""Scoring: the metrics chosen for a set of video pairs, run over streamed frames, and the report
(table + JSON). :mod:`evaluation.evaluate` is its command line; :mod:`evaluation.protocols` generates
videos through the pipeline and scores them here."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import torch

from evaluation import metrics as M
from evaluation import protocol, weights
from evaluation.protocol import VideoPair
from moditalker.assets import default_path
from moditalker.bulk import Ranks
from moditalker.device import resolve_device
from moditalker.errors import UserError
from moditalker.fileio import atomic_write_text

#: the report's columns, in order
COLUMNS = ("psnr", "ssim", "lpips", "fid", "fvd", "lmd", "lse_c", "lse_d", "csim", "cpbd")
HIGHER_IS_BETTER = {"psnr", "ssim", "lse_c", "csim", "cpbd"}
PACKAGES = ("torch", "torchmetrics", "lpips", "pytorch-fid", "cpbd-py312", "python_speech_features", "av")

PROTOCOL = {
    "fps": protocol.FPS,
    "size": f"{protocol.SIZE}x{protocol.SIZE} (resized, bilinear antialiased)",
    "alignment": f"by frame index; a length difference over {protocol.MAX_LENGTH_MISMATCH} frame is an error",
    "psnr": f"per frame on uint8 RGB (peak 255), capped at {M.PSNR_MAX:g} dB, mean over frames then videos",
    "ssim": "Gaussian window 11x11 sigma 1.5 on RGB in [0, 1] (channel mean), mean over frames then videos",
    "lpips": "LPIPS v0.1 AlexNet, inputs in [-1, 1], mean over frames then videos",
    "fid": "pytorch-fid InceptionV3 pool3 (2048-d), all frames, bilinear resize to 299",
    "fvd": f"I3D-400 logits (time-averaged) of non-overlapping {M.FVD_CLIP}-frame clips, shorter side -> "
    f"{M.FVD_SIZE}, centre crop, [-1, 1]",
    "lmd": "FAN 68 points on the 256x256 frames; 20 mouth points, each set centred on its mean; pixels",
    "lse": "SyncNet v2, BGR 0..255 frames resized to 224, MFCC 13x20 per 5-frame window, offset search "
    "+-15 frames; LSE-D = min mean distance, LSE-C = median - min",
    "csim": "ArcFace cosine similarity, identity = first real frame with a face, 5-point aligned 112x112",
    "cpbd": "CPBD (cpbd package) on ITU-R 601 grayscale frames, mean over frames then videos",
}

RANDOM_WARNING = (
    "warning: --random_weights: every learned metric uses a network with random weights and FAN is replaced "
    "by a fixed template face; the numbers only show that the tool runs"
)


def parse_metrics(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in weights.METRICS]
    if unknown or not names:
        raise UserError(f"unknown metric(s) {unknown or [text]}; choose from {','.join(weights.METRICS)}")
    return list(dict.fromkeys(names))


def parse_weights(items: Sequence[str]) -> dict[str, str]:
    out = {}
    assets = {a for names in weights.METRIC_ASSETS.values() for a in names}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in assets:
            raise UserError(
                f"--weights takes NAME=PATH with NAME one of {', '.join(sorted(assets))}; got {item!r}"
            )
        out[key.strip()] = value.strip()
    return out


def select_metrics(
    requested: list[str] | None,
    overrides: dict[str, str],
    random: bool,
    pool: Sequence[str] = weights.METRICS,
) -> tuple[list[str], dict[str, str]]:
    """The metrics to run and ``{metric: why skipped}``: the ``requested`` ones, else those of
    ``pool`` whose files are present; a requested metric with a missing file is a UserError naming
    the file."""
    if random:
        return list(requested or pool), {}
    chosen, skipped = [], {}
    for name in requested or pool:
        missing = weights.missing_assets(name, overrides)
        if missing and requested is not None:
            raise UserError(f"metric {name} needs {missing[0]}")
        if missing:  # one short line: the asset names and where to read more (missing_message's first word)
            assets = [line.split(":", 1)[0] for line in missing]
            where = f"python -m moditalker.assets check --only {' '.join(assets)}"
            skipped[name] = f"missing weights: {', '.join(assets)} (see `{where}`)"
        else:
            chosen.append(name)
    return chosen, skipped


def build_metrics(
    names: list[str], device: torch.device, overrides: dict[str, str], random: bool, batch: int
) -> tuple[dict[str, M.Metric], object]:
    """The metric objects and the landmark detector (None when no metric needs landmarks)."""
    out: dict[str, M.Metric] = {}
    o = overrides.get
    for name in names:
        if name == "psnr":
            out[name] = M.PSNR()
        elif name == "ssim":
            out[name] = M.SSIM()
        elif name == "lpips":
            out[name] = M.LPIPS(weights.build_lpips(o("lpips_alexnet"), device, random))
        elif name == "fid":
            out[name] = M.FID(weights.build_inception(o("fid_inception"), device, random))
        elif name == "fvd":
            out[name] = M.FVD(weights.build_i3d(o("i3d_400"), device, random))
        elif name == "lmd":
            out[name] = M.LMD()
        elif name == "lse":
            out[name] = M.LSE(weights.build_syncnet(o("syncnet"), device, random), device, batch)
        elif name == "csim":
            out[name] = M.CSIM(weights.build_arcface(o("arcface"), device, random), device)
        elif name == "cpbd":
            out[name] = M.CPBD()
    landmarks = None
    if any(m.needs_landmarks for m in out.values()):
        landmarks = weights.build_landmarks(o("face_alignment"), device, random, batch)
    return out, landmarks


def run_metrics(
    pairs: list[VideoPair],
    metrics: dict[str, M.Metric],
    device: torch.device,
    landmarks=None,
    chunk: int = 16,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> tuple[dict, dict, dict] | None:
    """Stream every pair through every metric -> ``(metrics, per_video, reference)``.

    With several launched ``ranks`` (:mod:`moditalker.bulk`) each rank scores every world-th pair;
    rank 0 gathers the per-video records and replays them in the order of ``pairs`` (the Frechet
    metrics: the features of every chunk), so the result is the one a single process computes;
    the other ranks return None."""
    ranks = ranks or Ranks()
    if ranks.distributed:
        for m in metrics.values():
            m.keep = True
    mine = pairs[ranks.group_rank :: ranks.group_size]
    per_video: dict[str, dict[str, float]] = {}
    records: dict[str, dict] = {}
    bar = ranks.bar(total=sum(p.frames for p in mine), unit="frame", desc="evaluate", disable=not progress)
    try:
        for pair in mine:
            for m in metrics.values():
                m.start(pair)
            frames = 0
            for pred, gt in protocol.iter_pair(pair, device, chunk):
                c = M.Chunk(pred, gt)
                if landmarks is not None:
                    c.pred_lm = landmarks.detect_raw(c.numpy("pred"))
                    c.gt_lm = landmarks.detect_raw(c.numpy("gt"))
                for m in metrics.values():
                    m.update(c)
                frames += len(pred)
                bar.update(len(pred))
            row: dict[str, float] = {"frames": frames}
            for m in metrics.values():
                row.update(m.finish_video())
            per_video[pair.name] = row
            if ranks.distributed:
                records[pair.name] = {k: m.record() for k, m in metrics.items()}
                ranks.log(f"scored {pair.name} ({frames} frames)")
    finally:
        bar.close()
    if ranks.distributed:
        gathered = ranks.gather((per_video, records))
        if gathered is None:
            return None
        rows = {k: v for part, _ in gathered for k, v in part.items()}
        recs = {k: v for _, part in gathered for k, v in part.items()}
        per_video = {p.name: rows[p.name] for p in pairs}
        for key, m in metrics.items():
            m.reset()
            for p in pairs:
                m.replay(recs[p.name][key])
    results: dict[str, float] = {}
    reference: dict[str, float] = {}
    for m in metrics.values():
        r, ref = m.result()
        results.update(r)
        reference.update(ref)
    order = {k: i for i, k in enumerate(COLUMNS)}
    results = dict(sorted(results.items(), key=lambda kv: order.get(kv[0], 99)))
    reference = dict(sorted(reference.items(), key=lambda kv: order.get(kv[0], 99)))
    return results, per_video, reference


#: below the table when a value is nan: the metric had nothing to measure in any video
NAN_NOTE = (
    "nan: nothing to measure (lse: no audio track or under 6 frames; csim, lmd: no face found; "
    "fid, fvd: fewer than 2 frames / 2 clips of 16 frames in all); -: not computed for the real videos"
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan"
    if abs(value) >= 1e6:
        return f"{value:.3g}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def format_table(results: dict, reference: dict) -> str:
    """The report as a fixed-width table: the generated videos' row and the real videos' row."""
    cols = [c for c in COLUMNS if c in results or c in reference]
    heads = [f"{c}{'↑' if c in HIGHER_IS_BETTER else '↓'}" for c in cols]
    rows = [
        ("generated", [results.get(c) for c in cols]),
        ("real (reference)", [reference.get(c) for c in cols]),
    ]
    width = [max(len(h), 8) for h in heads]
    lines = ["".ljust(18) + "  ".join(h.rjust(w) for h, w in zip(heads, width))]
    for label, values in rows:
        lines.append(label.ljust(18) + "  ".join(_fmt(v).rjust(w) for v, w in zip(values, width)))
    if any(v is not None and not math.isfinite(v) for _, values in rows for v in values):
        lines.append(NAN_NOTE)
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


#: flags of the generating protocols (:mod:`evaluation.protocols`) only
PROTOCOL_ONLY = ("data", "split_file", "pairs", "out", "max_videos", "seconds", "config", "set", "work_dir")


def score(
    pairs: list[VideoPair],
    requested: list[str] | None,
    overrides: dict[str, str],
    *,
    random: bool,
    device: str,
    batch: int,
    progress: bool = True,
    pool: Sequence[str] = weights.METRICS,
    ranks: Ranks | None = None,
) -> dict | None:
    """Score ``pairs`` -> the report ``{metrics, per_video, settings, reference}`` (``settings``
    without the inputs, which the caller adds). Without ``requested``, every metric of ``pool`` whose
    weights are present runs and the others are listed on stderr as skipped. With several launched
    ``ranks`` the pairs are shared out (:func:`run_metrics`); rank 0 returns the report, the others
    None."""
    ranks = ranks or Ranks()
    names, skipped = select_metrics(requested, overrides, random, pool)
    for name, why in skipped.items():
        if ranks.is_main:
            print(f"skipped {name}: {why}", file=sys.stderr)
    if not names:
        raise UserError("no metric can run (see the skipped lines above)")
    if random and ranks.is_main:
        print(RANDOM_WARNING, file=sys.stderr)
    dev = resolve_device(ranks.device(device))
    metric_objs, landmarks = build_metrics(names, dev, overrides, random, batch)
    scored = run_metrics(pairs, metric_objs, dev, landmarks, batch, progress=progress, ranks=ranks)
    if scored is None:
        return None
    results, per_video, reference = scored
    used = sorted({a for n in names for a in weights.METRIC_ASSETS[n]})
    settings = {
        "videos": len(pairs),
        "frames": sum(p.frames for p in pairs),
        "metrics_run": names,
        "skipped": skipped,
        "random_weights": bool(random),
        "weights": {a: "random" if random else str(overrides.get(a) or default_path(a)) for a in used},
        "device": str(dev),
        "protocol": {k: v for k, v in PROTOCOL.items() if k in names or k in ("fps", "size", "alignment")},
        "packages": _versions(),
    }
    return {"metrics": results, "per_video": per_video, "settings": settings, "reference": reference}


def score_args(
    args: Any,
    pairs: list[VideoPair],
    requested: list[str] | None,
    overrides: dict[str, str],
    *,
    ranks: Ranks | None = None,
    pool: Sequence[str] = weights.METRICS,
) -> dict | None:
    """:func:`score` with the evaluation command line's settings (``--random_weights``, ``--device``,
    ``--batch_size``, ``--no_progress``): the one call of ``--pred/--gt`` and of the protocols."""
    return score(
        pairs,
        requested,
        overrides,
        random=args.random_weights,
        device=args.device,
        batch=args.batch_size,
        progress=not args.no_progress,
        pool=pool,
        ranks=ranks,
    )


def write_report(report: dict, json_path: str | None) -> None:
    """Print the table; with ``json_path`` also write the report there (checked beforehand)."""
    print(format_table(report["metrics"], report["reference"]))
    if json_path:
        atomic_write_text(json_path, json.dumps(_json_safe(report), indent=2) + "\n")
        print(f"wrote {json_path}")
