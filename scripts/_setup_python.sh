# Sourced by the scripts that set the environment up when it is missing (after they set ROOT): PY is
# $PYTHON, else the repo's .venv Python once scripts/setup.sh has made sure it is installed.
if [ -z "${PYTHON:-}" ]; then
  bash "$ROOT/scripts/setup.sh"
  PY="$ROOT/.venv/bin/python"
else
  PY="$PYTHON"
  if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: PYTHON=$PY: no such Python" >&2
    exit 2
  fi
  # a relative path stays valid after a cd
  case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
fi
