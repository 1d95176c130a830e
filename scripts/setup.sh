#!/usr/bin/env bash
# Create .venv in the repo root (when missing) and install requirements.txt plus this repo (editable).
# Re-running is cheap: it reinstalls only when requirements.txt or pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found; install Python >= 3.10 or set PYTHON=/path/to/python" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "error: Python >= 3.10 is required ($("$PYTHON" --version 2>&1) found)" >&2
  exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

STAMP="$VENV/.moditalker-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "[setup] installing requirements (a few minutes the first time)"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$ROOT"
echo "$WANT" > "$STAMP"
echo "[setup] done: $VENV"
