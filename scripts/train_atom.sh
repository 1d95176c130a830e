#!/usr/bin/env bash
# Train AToM. Extra arguments are key=value config overrides, e.g.
#   scripts/train_atom.sh data.root=data/train/lrs3 train.batch_size=32
# Several GPUs / nodes: ACCELERATE="accelerate launch --multi_gpu --num_processes 4" scripts/train_atom.sh
# CONFIG=configs/atom_tiny.yaml picks another config. Resumes from the latest checkpoint in train.out_dir.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CONFIG="${CONFIG:-configs/atom.yaml}"
if [ -n "${ACCELERATE:-}" ]; then
  exec $ACCELERATE -m AToM.train --config "$CONFIG" "$@"
fi
exec "$PY" -m AToM.train --config "$CONFIG" "$@"
