#!/usr/bin/env bash
# Metrics of generated vs real talking-head videos under one fixed protocol (25 fps, 256x256, by frame).
#   scripts/evaluate.sh --pred P --gt G [--metrics psnr,ssim,lpips,fid,fvd,lmd,lse,csim,cpbd] \
#       [--json OUT.json] [--device auto|cpu|cuda:N] [--batch_size 16] [--weights NAME=PATH ...] \
#       [--random_weights] [--overwrite]
# P and G: folders of .mp4 files with the same names (or two .mp4 files). See `scripts/evaluate.sh --help`.
# Generating protocols (the videos are made first with the current checkpoints, through the pipeline):
#   scripts/evaluate.sh --protocol hdtf_selfrecon --data DIR --split_file FILE --out OUT \
#       [--max_videos N] [--seconds S] [--config YAML] [--set KEY=VALUE ...] [--work_dir W] [--overwrite]
#   scripts/evaluate.sh --protocol cross_identity --data DIR --pairs FILE|auto [--split_file FILE] --out OUT
# On several GPUs or machines: NUM_PROCESSES=N (and NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP; see
# scripts/_bulk.sh): each rank generates and scores its share, the report is the one one process writes.
# --protocol ... --shard K --num_shards N: independent jobs generate their share; rerun without to score.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec bash "$ROOT/scripts/_bulk.sh" "evaluation" evaluation "$@"
