#!/usr/bin/env bash
# Train the MToV landmark ("motion") autoencoder (-> autoencoder_motion.pth): initialised from the RGB
# autoencoder, TimeSformer decoder frozen, trained on rendered landmark-dot clips (radius-3 dots).
#
#   scripts/train_mtov_ae_ldmk.sh data.root=data/train/HDTF --init_from runs/mtov_ae_rgb/model_last.pth
#   scripts/train_mtov_ae_ldmk.sh data.root=... --out_dir runs/mtov_ae_ldmk --device cuda [key=value ...]
#   NUM_PROCESSES=4 scripts/train_mtov_ae_ldmk.sh ...               # 4 GPUs via `accelerate launch`
#
# --init_from defaults to checkpoints/autoencoder_rgb.pth (configs/mtov_autoencoder_ldmk.yaml).
# Rerunning the same command resumes from {out_dir}/state. Launcher variables: scripts/_train.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
exec "$ROOT/scripts/_train.sh" MToV.train_autoencoder \
  --config "${CONFIG:-$ROOT/configs/mtov_autoencoder_ldmk.yaml}" --mode ldmk "$@"
