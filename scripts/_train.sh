#!/usr/bin/env bash
# Shared by the training scripts: run `python -m MODULE ARGS...` in .venv, either as one process or,
# when NUM_PROCESSES > 1 or NUM_MACHINES > 1, under `accelerate launch` (several GPUs or nodes).
#
#   NUM_PROCESSES    processes in all (all machines together; default 1)
#   NUM_MACHINES     machines (default 1); with more than one also set on every machine:
#   MACHINE_RANK     this machine's rank (0 on the main machine)
#   MAIN_PROCESS_IP  address of the rank-0 machine
#   MAIN_PROCESS_PORT rendezvous port (default 29500; another one for a second job on the same machine)
#   ACCELERATE_ARGS  anything else for `accelerate launch`, e.g. "--config_file my_accelerate.yaml"
#
# Mixed precision is the trainer's own config value (AToM train.mixed_precision, MToV train.amp).
#
#   scripts/_train.sh <module> [args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULE="$1"
shift
# shellcheck source=scripts/_setup_python.sh
source "$ROOT/scripts/_setup_python.sh"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
NUM_MACHINES="${NUM_MACHINES:-1}"
for v in NUM_PROCESSES NUM_MACHINES; do
  if ! [[ "${!v}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $v must be a positive integer, got '${!v}'" >&2
    exit 2
  fi
done
if [ "$NUM_PROCESSES" -le 1 ] && [ "$NUM_MACHINES" -le 1 ]; then
  exec "$PY" -m "$MODULE" "$@"
fi
launch=(--num_processes "$NUM_PROCESSES" --num_machines "$NUM_MACHINES")
if [ "$NUM_MACHINES" -gt 1 ]; then
  if [ -z "${MACHINE_RANK:-}" ] || [ -z "${MAIN_PROCESS_IP:-}" ]; then
    echo "error: NUM_MACHINES=$NUM_MACHINES needs MACHINE_RANK and MAIN_PROCESS_IP on every machine" >&2
    exit 2
  fi
  launch+=(--machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP")
fi
if [ -n "${MAIN_PROCESS_PORT:-}" ]; then  # default 29500; set it to run two jobs on one machine
  launch+=(--main_process_port "$MAIN_PROCESS_PORT")
fi
# --multi_gpu = torchrun; on a machine without GPUs the trainers join a gloo group (MULTI_CPU)
launch+=(--multi_gpu --mixed_precision no --dynamo_backend no)  # precision is the trainer's config value
# shellcheck disable=SC2086
exec "$PY" -m moditalker.training.launch "${launch[@]}" ${ACCELERATE_ARGS:-} -m "$MODULE" "$@"
