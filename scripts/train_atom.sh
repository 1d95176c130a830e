#!/usr/bin/env bash
# Train AToM (-> checkpoints/step_*.pt, the official checkpoint layout). Extra arguments are
# key=value config overrides:
#
#   scripts/train_atom.sh data.root=data/train/lrs3 train.batch_size=32
#   CONFIG=configs/atom_tiny.yaml scripts/train_atom.sh data.root=...      # tiny CPU smoke run
#   NUM_PROCESSES=4 scripts/train_atom.sh data.root=...                    # 4 GPUs via `accelerate launch`
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=HOST NUM_PROCESSES=16 scripts/train_atom.sh ...  # 2 nodes
#
# Resumes from the latest checkpoint in train.out_dir. Launcher variables: scripts/_train.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
exec "$ROOT/scripts/_train.sh" AToM.train --config "${CONFIG:-$ROOT/configs/atom.yaml}" "$@"
