#!/usr/bin/env bash
# AToM inference: HuBERT features + reference frontal landmark -> frontal landmarks for the whole audio.
# Usage: scripts/inference_atom.sh HUBERT.npy REF_LM3D.npy OUT.npy [more AToM.inference flags]
#   e.g. scripts/inference_atom.sh results/hubert.npy results/ref_lm3d.npy results/atom.npy --ema --png_dir results/atom_png
# Defaults: --checkpoint checkpoints/atom.pt --bfm_dir checkpoints/BFM --steps 50 --eta 1 --guidance 2 --seed 0
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: scripts/inference_atom.sh HUBERT.npy REF_LM3D.npy OUT.npy [flags of python -m AToM.inference]"
# shellcheck source=scripts/_python.sh
case "${1:-}" in
  -h | --help)
    source "$ROOT/scripts/_python.sh"
    printf '%s\n(the three files fill --hubert, --ref_lm3d and --out)\n\n' "$usage"
    exec "$PY" -m AToM.inference --help
    ;;
esac
if [ "$#" -lt 3 ]; then
  echo "$usage" >&2
  exit 2
fi
# shellcheck source=scripts/_python.sh
source "$ROOT/scripts/_python.sh"
HUBERT="$1"; REF="$2"; OUT="$3"; shift 3
exec "$PY" -m AToM.inference --hubert "$HUBERT" --ref_lm3d "$REF" --out "$OUT" \
  --checkpoint "${CHECKPOINT:-$ROOT/checkpoints/atom.pt}" --bfm_dir "${BFM_DIR:-$ROOT/checkpoints/BFM}" "$@"
