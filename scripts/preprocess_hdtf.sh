#!/usr/bin/env bash
# HDTF-style dataset for MToV: videos -> 25 fps frames (256x256) + keypoint tree (FAN + Deep3DFaceRecon).
#
#   scripts/preprocess_hdtf.sh --videos data/HDTF/videos --out_dir data/train/HDTF [--hubert]
#   NUM_PROCESSES=4 scripts/preprocess_hdtf.sh --videos ... --out_dir ...  # 4 processes (GPUs: one each)
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=HOST NUM_PROCESSES=16 scripts/preprocess_hdtf.sh ...
#   scripts/preprocess_hdtf.sh --shard K --num_shards 8 ...   # 8 independent jobs (K = 0..7), one tree
#
# Launcher variables and aliases (NUM_SHARDS, DEVICES): scripts/_bulk.sh. Failed ids are listed at the
# end (exit 2); the others are kept. Resumable: finished ids (meta/{id}.json) are skipped on the next
# run. Weights: checkpoints/
# (`python -m moditalker.assets check --only face_alignment deep3d bfm_front bfm_similarity`).
# All flags: python -m data.preprocess hdtf --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
exec bash "$ROOT/scripts/_bulk.sh" "hdtf preprocessing" data.preprocess hdtf "$@"
