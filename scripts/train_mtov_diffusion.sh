#!/usr/bin/env bash
# Train the MToV latent diffusion UNet (-> diffusion_model.pth) with both autoencoders frozen.
#
#   scripts/train_mtov_diffusion.sh data.root=data/train/HDTF data.split_file=data/train/HDTF/test_ids.txt
#   scripts/train_mtov_diffusion.sh --ae_rgb checkpoints/autoencoder_rgb.pth \
#       --ae_ldmk checkpoints/autoencoder_motion.pth --out_dir runs/mtov_diffusion train.batch_size=10
#   CONFIG=configs/mtov_diffusion_longvid.yaml scripts/train_mtov_diffusion.sh data.root=...   # 256-channel variant
#   CONFIG=configs/mtov_tiny.yaml scripts/train_mtov_diffusion.sh data.root=... random_autoencoders=true  # CPU smoke run
#   NUM_PROCESSES=4 scripts/train_mtov_diffusion.sh data.root=...      # 4 GPUs via `accelerate launch`
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=HOST NUM_PROCESSES=16 scripts/train_mtov_diffusion.sh ...
#
# Rerunning the same command resumes from {out_dir}/state (UNet, optimizer, EMA, step).
# Outputs: {out_dir}/diffusion_model.pth (EMA weights, what MToV.sample loads), model_last.pth,
# metrics.jsonl (validation loss), tb/ (tensorboard), config.yaml. Launcher variables: scripts/_train.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
exec "$ROOT/scripts/_train.sh" MToV.train_diffusion --config "${CONFIG:-$ROOT/configs/mtov_diffusion.yaml}" "$@"
