#!/usr/bin/env bash
# Shared by the bulk scripts (preprocess_hdtf.sh, preprocess_lrs3.sh, inference.sh --batch_file,
# evaluate.sh --protocol): run `python -m MODULE ARGS...` as one process or, when NUM_PROCESSES > 1 or
# NUM_MACHINES > 1, under the training launcher (scripts/_train.sh: NUM_PROCESSES, NUM_MACHINES,
# MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT, ACCELERATE_ARGS). Each rank takes its share of the
# sorted items on cuda:LOCAL_RANK (or the CPU); rank 0 gathers the failed items at the end (see
# moditalker/bulk.py). Independent jobs without a rendezvous (a Slurm array): --shard K --num_shards N.
#
# Older names, kept as aliases:
#   NUM_SHARDS=N               same as NUM_PROCESSES=N (NUM_PROCESSES wins when both are set)
#   DEVICES="cuda:0 cuda:2"    same as CUDA_VISIBLE_DEVICES=0,2 (ranks take these GPUs round-robin);
#                              DEVICES=cpu runs on the CPU. Without NUM_PROCESSES/NUM_SHARDS: one
#                              process per device listed.
#
#   scripts/_bulk.sh "<job name for messages>" <module> [args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_python.sh
source "$ROOT/scripts/_python.sh"
export MODITALKER_JOB="$1"
MODULE="$2"
shift 2
if [ -n "${DEVICES:-}" ]; then
  read -r -a devs <<< "$DEVICES"
  gpus=()
  for d in "${devs[@]}"; do
    case "$d" in
      cuda:[0-9]*) gpus+=("${d#cuda:}") ;;
      cpu) ;;
      *)
        echo "error: DEVICES=\"$DEVICES\": use cuda:N entries (or cpu), e.g. DEVICES=\"cuda:0 cuda:1\"" >&2
        exit 2
        ;;
    esac
  done
  if [ "${#gpus[@]}" -gt 0 ] && [ "${#gpus[@]}" -ne "${#devs[@]}" ]; then
    echo "error: DEVICES=\"$DEVICES\" mixes GPUs and the CPU; list GPUs only, or cpu" >&2
    exit 2
  fi
  CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${gpus[*]}")"
  export CUDA_VISIBLE_DEVICES
  NUM_SHARDS="${NUM_SHARDS:-${#devs[@]}}"
fi
if [ -z "${NUM_PROCESSES:-}" ] && [ -n "${NUM_SHARDS:-}" ]; then
  export NUM_PROCESSES="$NUM_SHARDS"
fi
export PYTHON="$PY"
exec "$ROOT/scripts/_train.sh" "$MODULE" "$@"
