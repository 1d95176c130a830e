#!/usr/bin/env bash
# LRS3-style dataset for AToM: every clip -> {out_dir}/{split}_{speaker}_{clip}.npz with
# hubert [2T, 1024] and idexp_lm3d [T, 68, 3] (+ coeff [T, 257]).
#
#   scripts/preprocess_lrs3.sh --root data/LRS3/trainval --out_dir data/train/lrs3_npz/train
#   scripts/preprocess_lrs3.sh --root data/LRS3/test --out_dir data/train/lrs3_npz/val
#   NUM_PROCESSES=4 scripts/preprocess_lrs3.sh --root ... --out_dir ...    # 4 processes (GPUs: one each)
#   scripts/preprocess_lrs3.sh --shard K --num_shards 8 ...   # 8 independent jobs (K = 0..7), one folder
#
# Launcher variables and aliases (NUM_SHARDS, DEVICES): scripts/_bulk.sh. Failed ids are listed at the
# end (exit 2); the others are kept. Resumable: existing .npz files are skipped. Weights: checkpoints/
# (`python -m moditalker.assets check`).
# All flags: python -m data.preprocess lrs3 --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
exec bash "$ROOT/scripts/_bulk.sh" "lrs3 preprocessing" data.preprocess lrs3 "$@"
