"""Evaluate generated talking-head videos against the real ones: one command, one fixed protocol.

    python -m evaluation --pred P --gt G [--metrics psnr,ssim,...] [--json OUT.json] [--device auto]

P and G are folders of mp4 files with the same names (or two mp4 files). Without ``--metrics``
every metric whose weights are present runs and the others are listed as skipped, with the reason;
a metric named in ``--metrics`` whose weights are missing is an error. See :mod:`evaluation.protocol`
for the protocol and :mod:`evaluation.metrics` for each metric.

    python -m evaluation --protocol hdtf_selfrecon --data DIR --split_file FILE --out OUT [...]
    python -m evaluation --protocol cross_identity --data DIR --pairs FILE|auto --out OUT [...]

generate the videos first, through the end-to-end pipeline, then score them (:mod:`evaluation.protocols`).

Several processes (``NUM_PROCESSES=N scripts/evaluate.sh ...``, :mod:`moditalker.bulk`): each rank
generates and scores its share of the videos on its own device; FID and FVD replay every rank's
features on rank 0, so the report is the one a single process writes. ``--shard K --num_shards N``
(independent jobs) generate their share of a protocol's videos only; the same command without them
then scores them all.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from evaluation import protocol, weights
from evaluation.scoring import (  # noqa: F401 - run_metrics, score, format_table: importable from here too
    PROTOCOL,
    PROTOCOL_ONLY,
    format_table,
    parse_metrics,
    parse_weights,
    run_metrics,
    score,
    score_args,
    write_report,
)
from moditalker import bulk
from moditalker.bulk import add_shard_args
from moditalker.errors import ArgumentParser, UserError, cli_main, script_prog
from moditalker.fileio import check_output


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog=script_prog("python -m evaluation"),
        description="Metrics of generated vs real talking-head videos (PSNR, SSIM, LPIPS, FID, FVD, LMD, "
        "LSE-C/D, CSIM, CPBD) under one fixed protocol; prints a table with the real videos' reference row. "
        "With --protocol it first generates the videos through the end-to-end pipeline.",
    )
    ap.add_argument("--pred", default=None, help="folder of generated .mp4 files (or one .mp4)")
    ap.add_argument("--gt", default=None, help="folder of real .mp4 files with the same names (or one .mp4)")
    ap.add_argument(
        "--metrics",
        default=None,
        help=f"comma list of {','.join(weights.METRICS)} (default: all whose weights are present)",
    )
    ap.add_argument(
        "--json", default=None, help="also write the report as JSON here (--protocol: OUT/report.json)"
    )
    ap.add_argument(
        "--device", default="auto", help="auto|cpu|cuda|cuda:N (metrics and, with --protocol, pipeline)"
    )
    ap.add_argument("--batch_size", type=int, default=16, help="frames per chunk on the device")
    ap.add_argument(
        "--weights",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="another location for an asset (lpips_alexnet, fid_inception, i3d_400, syncnet, "
        "arcface, face_alignment)",
    )
    ap.add_argument(
        "--random_weights",
        action="store_true",
        help="random networks and a template face instead of the weights (smoke runs only); with "
        "--protocol the pipeline's networks are random too",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --json file (--protocol: regenerate every video and replace the report)",
    )
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_shard_args(ap, "videos (--protocol: generation only; run once more without them to score)")
    g = ap.add_argument_group(
        "generating protocols",
        "generate the videos with the current checkpoints through the end-to-end pipeline, then score them",
    )
    g.add_argument(
        "--protocol",
        choices=("hdtf_selfrecon", "cross_identity"),
        default=None,
        help="hdtf_selfrecon: each test video from its own audio and frames, scored against itself; "
        "cross_identity: the audio of one id with the reference of another, no-reference metrics only",
    )
    g.add_argument(
        "--data", default=None, help="folder of the videos with audio: {id}.mp4 (or {id}/one video)"
    )
    g.add_argument(
        "--split_file",
        default=None,
        help="the test ids, one per line (# comments); default: the original's HDTF test split "
        "(evaluation/hdtf_test_ids.txt, 98 ids)",
    )
    g.add_argument(
        "--pairs",
        default=None,
        help="cross_identity: a file of 'audio_id ref_id' lines, or 'auto' (each test id of --split_file "
        "with the next one's reference, cyclic)",
    )
    g.add_argument("--out", default=None, help="output folder: generated/, real/, audio/, report.json")
    g.add_argument("--max_videos", type=int, default=None, help="only the first N ids (or pairs)")
    g.add_argument("--seconds", type=float, default=None, help="only the first S seconds of each video")
    g.add_argument("--config", default=None, help="pipeline YAML config (default: configs/inference.yaml)")
    g.add_argument(
        "--set",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="pipeline setting overrides (atom.steps=25)",
    )
    g.add_argument(
        "--work_dir",
        default=None,
        help="pipeline cache folder shared by every video and kept (default: OUT/work/NAME, removed "
        "once NAME is done)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    requested = parse_metrics(args.metrics)
    overrides = parse_weights(args.weights)
    bulk.check_shard(args.shard, args.num_shards)
    if args.protocol is not None:
        from evaluation import protocols

        return protocols.run(args, requested, overrides)
    if args.num_shards > 1:
        raise UserError(
            "--shard/--num_shards split the generation of a --protocol; to score --pred/--gt on several "
            "processes use NUM_PROCESSES=N scripts/evaluate.sh (FID and FVD need every video in one run)"
        )
    protocols_flags = [f"--{k}" for k in PROTOCOL_ONLY if getattr(args, k) not in (None, False)]
    if protocols_flags:
        raise UserError(f"{', '.join(protocols_flags)} need(s) --protocol hdtf_selfrecon|cross_identity")
    if args.pred is None or args.gt is None:
        raise UserError("--pred and --gt are required (or --protocol hdtf_selfrecon|cross_identity)")
    if args.json:
        check_output(args.json, args.overwrite, (args.pred, args.gt))
    pairs = protocol.make_pairs(args.pred, args.gt)  # input errors before any network is built
    ranks = bulk.start()
    try:
        report = score_args(args, pairs, requested, overrides, ranks=ranks)
    finally:
        ranks.close()
    if report is None:  # not rank 0: it writes the report
        return {}
    report["settings"] = {"pred": str(args.pred), "gt": str(args.gt), **report["settings"]}
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    cli_main(main)
