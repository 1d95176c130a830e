#!/usr/bin/env bash
# Web page: upload speech and a face, watch the talking head; the networks stay loaded between requests.
#   scripts/app.sh [--host 127.0.0.1] [--port 7860] [--config configs/inference.yaml] \
#       [--device auto|cpu|cuda:N] [--random_weights] [--out_dir outputs/app] [--share] \
#       [--max_queue 20] [--max_upload_mb 50] [--auth USER:PASS] [key=value ...]
# Then open http://127.0.0.1:7860/ . See `scripts/app.sh --help`. Run scripts/setup.sh once first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_python.sh
source "$ROOT/scripts/_python.sh"
export GRADIO_ANALYTICS_ENABLED=False
exec "$PY" -m webapp "$@"
