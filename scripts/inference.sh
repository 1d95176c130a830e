#!/usr/bin/env bash
# Audio + reference video (or photo) -> talking-head mp4, in one command.
#   scripts/inference.sh --audio A.wav --ref_video V.mp4 --out OUT.mp4 \
#       [--config configs/inference.yaml] [--ref_image IMG] [--ref_frame N] [--preview] \
#       [--seed S] [--steps N] [--guidance W] [--batch_size B] [--device auto|cpu|cuda:N] \
#       [--random_weights] [--overwrite] [key=value ...]
# Several videos with the networks loaded once: scripts/inference.sh --batch_file jobs.txt [common flags]
# (one job per line, written as this command's arguments; see pipeline/batch.py). A rerun skips the videos
# already rendered with the same settings. On several GPUs or machines: NUM_PROCESSES=N (and NUM_MACHINES,
# MACHINE_RANK, MAIN_PROCESS_IP, see scripts/_bulk.sh) or independent jobs with --shard K --num_shards N.
# See `scripts/inference.sh --help`. Run scripts/setup.sh once first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
exec bash "$ROOT/scripts/_bulk.sh" "inference" pipeline.inference "$@"
