# Sourced by the scripts that set the environment up when it is missing (after they set ROOT): PY is
# $PYTHON, else the repo's .venv Python once scripts/setup.sh has made sure it is installed.
if [ -z "${PYTHON:-}" ]; then
  bash "$ROOT/scripts/setup.sh"
  PY="$ROOT/.venv/bin/python"
else
  PY="$PYTHON"
fi
