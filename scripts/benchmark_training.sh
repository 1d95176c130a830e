#!/usr/bin/env bash
# Seconds per MToV diffusion training step, frame-based vs latent cache, side by side in one run, with
# full-size random-weight networks on a synthetic HDTF tree (no checkpoints or data needed).
#   scripts/benchmark_training.sh [--device cpu|cuda] [--steps N] [--batch_size B] [--tiny] --json OUT.json
#   scripts/benchmark_training.sh --tiny --json /tmp/bench.json          # smoke run (a minute on a CPU)
# See `scripts/benchmark_training.sh --help`. Sets up .venv first when missing (scripts/setup.sh);
# PYTHON=/path/to/python uses that interpreter instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
# shellcheck source=scripts/_setup_python.sh
source "$ROOT/scripts/_setup_python.sh"
exec "$PY" -m benchmarks.training "$@"
