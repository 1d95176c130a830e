#!/usr/bin/env bash
# Does training learn? Builds the synthetic talking-face world (data.synthetic), trains tiny AToM, both
# MToV autoencoders and the UNet (from the latent cache) on it with the normal training scripts, and
# scores them on held-out sentences against known answers (JSON + a table on stdout).
#   scripts/benchmark_learning.sh [--seed S] [--json OUT.json] [--device cpu|cuda] [--out DIR]
# See `scripts/benchmark_learning.sh --help`. Sets up .venv first when missing (scripts/setup.sh);
# PYTHON=/path/to/python uses that interpreter instead. Rerunning with the same --out resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
# shellcheck source=scripts/_setup_python.sh
source "$ROOT/scripts/_setup_python.sh"
exec "$PY" -m benchmarks.learning "$@"
