#!/usr/bin/env bash
# Shared by the dataset builders: run `python -m data.preprocess <builder> ARGS...` as NUM_SHARDS
# parallel processes (--shard i --num_shards n); DEVICES="cuda:0 cuda:1 ..." spreads them round-robin.
#   scripts/_shards.sh <builder> [args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_python.sh
source "$ROOT/scripts/_python.sh"
BUILDER="$1"
shift
NUM_SHARDS="${NUM_SHARDS:-1}"
read -r -a DEVS <<< "${DEVICES:-}"
if [ "$NUM_SHARDS" -le 1 ] && [ "${#DEVS[@]}" -eq 0 ]; then
  exec "$PY" -m data.preprocess "$BUILDER" "$@"
fi
pids=()
for ((i = 0; i < NUM_SHARDS; i++)); do
  extra=(--shard "$i" --num_shards "$NUM_SHARDS")
  if [ "${#DEVS[@]}" -gt 0 ]; then
    extra+=(--device "${DEVS[$((i % ${#DEVS[@]}))]}")
  fi
  "$PY" -m data.preprocess "$BUILDER" "$@" "${extra[@]}" &
  pids+=("$!")
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || rc=$?
done
exit "$rc"
