#!/usr/bin/env bash
# Train the MToV RGB video autoencoder (-> autoencoder_rgb.pth) on an HDTF-style frames + keypoints tree.
#
#   scripts/train_mtov_ae.sh data.root=data/train/HDTF data.split_file=data/train/HDTF/test_ids.txt
#   scripts/train_mtov_ae.sh --out_dir runs/mtov_ae_rgb --device cuda train.batch_size=2 [key=value ...]
#   CONFIG=configs/mtov_autoencoder_tiny.yaml scripts/train_mtov_ae.sh data.root=...   # tiny CPU smoke run
#   NUM_PROCESSES=4 scripts/train_mtov_ae.sh data.root=...          # 4 GPUs via `accelerate launch`
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=HOST NUM_PROCESSES=16 scripts/train_mtov_ae.sh ...  # 2 nodes
#
# GAN phase (the original base_gan.yaml): rerun on the same out_dir with loss.disc_start=<current step>.
# Rerunning the same command resumes from {out_dir}/state (model, optimizers, scaler, step).
# Outputs: {out_dir}/model_last.pth (plain state_dict = autoencoder_rgb.pth), model_best.pth,
# metrics.jsonl (validation PSNR), tb/ (tensorboard), config.yaml. Launcher variables: scripts/_train.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
exec "$ROOT/scripts/_train.sh" MToV.train_autoencoder \
  --config "${CONFIG:-$ROOT/configs/mtov_autoencoder.yaml}" "$@"
