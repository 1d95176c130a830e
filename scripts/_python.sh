# Sourced by the stage scripts (after they set ROOT): PY is $PYTHON or the repo's .venv Python; a
# missing one is a one-line error, exit 2.
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: no Python at $PY; run scripts/setup.sh first (it creates $ROOT/.venv), or set PYTHON" >&2
  exit 2
fi
# a relative path stays valid after a cd
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
# shellcheck source=scripts/_allocator.sh
source "$ROOT/scripts/_allocator.sh"
# usage lines and "see ... --help" name the script the user ran (moditalker.errors.script_prog); the
# shared launchers (_bulk.sh, _train.sh) keep the name their caller exported
case "${0##*/}" in _*) ;; *) export MODITALKER_PROG="scripts/${0##*/}" ;; esac
