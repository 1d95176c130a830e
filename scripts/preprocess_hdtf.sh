#!/usr/bin/env bash
# HDTF-style dataset for MToV: videos -> 25 fps frames (256x256) + keypoint tree (FAN + Deep3DFaceRecon).
#
#   scripts/preprocess_hdtf.sh --videos data/HDTF/videos --out_dir data/train/HDTF [--hubert]
#   NUM_SHARDS=4 scripts/preprocess_hdtf.sh --videos ... --out_dir ...      # 4 processes in parallel
#   NUM_SHARDS=2 DEVICES="cuda:0 cuda:1" scripts/preprocess_hdtf.sh ...     # one shard per GPU
#
# Resumable: finished ids (meta/{id}.json) are skipped on the next run. Weights: checkpoints/
# (`python -m data.assets check --only face_alignment deep3d bfm_front bfm_similarity`).
# All flags: python -m data.preprocess hdtf --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
NUM_SHARDS="${NUM_SHARDS:-1}"
read -r -a DEVS <<< "${DEVICES:-}"
if [ "$NUM_SHARDS" -le 1 ] && [ "${#DEVS[@]}" -eq 0 ]; then
  exec "$PY" -m data.preprocess hdtf "$@"
fi
# NUM_SHARDS parallel processes; DEVICES="cuda:0 cuda:1 ..." spreads them round-robin.
pids=()
for ((i = 0; i < NUM_SHARDS; i++)); do
  extra=(--shard "$i" --num_shards "$NUM_SHARDS")
  if [ "${#DEVS[@]}" -gt 0 ]; then
    extra+=(--device "${DEVS[$((i % ${#DEVS[@]}))]}")
  fi
  "$PY" -m data.preprocess hdtf "$@" "${extra[@]}" &
  pids+=("$!")
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || rc=$?
done
exit "$rc"
