#!/usr/bin/env bash
# Speed of every inference stage: the original's call pattern ("faithful") vs the fast path, side by
# side, with full-size random-weight networks (no checkpoints needed).
#   scripts/benchmark.sh [--device cpu|cuda] [--seconds S] [--steps-scale F] [--json OUT.json] \
#       [--precision auto|bf16|int8|fp32] [--modes fast,fast_fp32,faithful] [--batch-size B] [--compile] \
#       [--threads N] [--tiny] [--cpu-isa native|avx2] [--recalibrate] [--calibration-file F.json]
# --steps-scale F < 1 runs F x the diffusion steps and extrapolates the times to full steps.
# --cpu-isa avx2 runs as on a CPU without AVX512, bf16 or int8 dot products (MKL obeys on Intel only).
# --precision auto on the CPU takes what was measured >= 1.15x faster than fp32 on this machine (timed
# once, kept in the user's cache folder; --recalibrate times again); the report says what and why.
# See `scripts/benchmark.sh --help`. Sets up .venv first when missing (scripts/setup.sh);
# PYTHON=/path/to/python uses that interpreter instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
# shellcheck source=scripts/_setup_python.sh
source "$ROOT/scripts/_setup_python.sh"
# shellcheck source=scripts/_allocator.sh
source "$ROOT/scripts/_allocator.sh"
exec "$PY" -m benchmarks.inference "$@"
