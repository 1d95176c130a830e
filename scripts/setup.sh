#!/usr/bin/env bash
# Create .venv in the repo root (when missing) and install requirements.txt plus this repo (editable).
# Re-running is cheap: it reinstalls only when requirements.txt or pyproject.toml changed.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/setup.sh installs the CPU-only torch builds.
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
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  # e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu: the CPU-only builds of the pinned torch,
  # torchvision and torchaudio (much smaller; no CUDA). The requirements below then find them installed.
  pins="$(grep -E '^(torch|torchvision|torchaudio)==' "$ROOT/requirements.txt" | tr '\n' ' ')"
  echo "[setup] torch from $TORCH_INDEX_URL: $pins"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --index-url "$TORCH_INDEX_URL" $pins
fi
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$ROOT"
echo "$WANT" > "$STAMP"
echo "[setup] done: $VENV"
