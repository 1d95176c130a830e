#!/usr/bin/env bash
# HDTF-style dataset for MToV: videos -> 25 fps frames (256x256) + keypoint tree (FAN + Deep3DFaceRecon).
#
#   scripts/preprocess_hdtf.sh --videos data/HDTF/videos --out_dir data/train/HDTF [--hubert]
#   NUM_SHARDS=4 scripts/preprocess_hdtf.sh --videos ... --out_dir ...      # 4 processes in parallel
#   NUM_SHARDS=2 DEVICES="cuda:0 cuda:1" scripts/preprocess_hdtf.sh ...     # one shard per GPU
#
# Resumable: finished ids (meta/{id}.json) are skipped on the next run. Weights: checkpoints/
# (`python -m moditalker.assets check --only face_alignment deep3d bfm_front bfm_similarity`).
# All flags: python -m data.preprocess hdtf --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec bash "$ROOT/scripts/_shards.sh" hdtf "$@"
