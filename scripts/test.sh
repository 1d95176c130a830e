#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
# RUN_SLOW=1 also runs the full-size and long tests.
# About 10 min on an idle 2-core AMD EPYC (Zen 5), about 23 min on a loaded 2-core VM (default suite).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$ROOT/.venv/bin/python" -m ruff check .
"$ROOT/.venv/bin/python" -m ruff format --check .
set +e
"$ROOT/.venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$rc"
