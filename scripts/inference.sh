#!/usr/bin/env bash
# Audio + reference video (or photo) -> talking-head mp4, in one command.
#   scripts/inference.sh --audio A.wav --ref_video V.mp4 --out OUT.mp4 \
#       [--config configs/inference.yaml] [--ref_image IMG] [--ref_frame N] [--preview] \
#       [--seed S] [--steps N] [--guidance W] [--batch_size B] [--device auto|cpu|cuda:N] \
#       [--random_weights] [--overwrite] [key=value ...]
# See `scripts/inference.sh --help`. Run scripts/setup.sh once first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
if [ ! -x "$PY" ]; then
  echo "error: $ROOT/.venv is missing; run scripts/setup.sh first" >&2
  exit 2
fi
exec "$PY" -m pipeline.inference "$@"
