#!/usr/bin/env bash
# MToV inference: aligned landmarks + reference video -> talking-head video (the original's
# noised start at t=250, 25 DDIM steps of 100, eta 1, non-overlapping 16-frame clips).
#
#   scripts/sample_mtov.sh --landmarks results/aligned.npy --ref_video ref.mp4 --audio speech.wav --out results/mtov
#   scripts/sample_mtov.sh --landmarks results/landmarks_png --ref_frames ref_frames/ \
#       --ref_landmarks ref_lm68.npy --out results/mtov --batch_size 8 --device cuda
#   scripts/sample_mtov.sh --config configs/mtov_tiny.yaml --random_weights ...   # smoke run, no checkpoints
#
# Checkpoints default to checkpoints/{autoencoder_rgb,autoencoder_motion,diffusion_model}.pth
# (--ae_rgb/--ae_ldmk/--unet override them). Outputs: {out}/video.mp4, config.yaml, frames/ (--save_frames).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_python.sh
source "$ROOT/scripts/_python.sh"
exec "$PY" -m MToV.sample "$@"
