#!/usr/bin/env bash
# Train every stage small, with no dataset and no licensed asset, each stage consuming the previous
# one's output (docs/training.md, "Train everything small"); then run the pipeline with the trained
# tiny checkpoints. The networks that are not trained here (HuBERT, FAN, Deep3DFaceRecon) are
# random stand-ins and the face model is synthetic (--random_weights): the result shows the chain
# works, it is not a talking head.
#   scripts/walkthrough_tiny.sh [OUT_DIR] [STEPS]      (defaults: runs/walkthrough, 50)
#   WALK_VIDEOS=2 WALK_SECONDS=1 scripts/walkthrough_tiny.sh ...   (fewer, shorter sample videos: faster)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: scripts/walkthrough_tiny.sh [OUT_DIR] [STEPS]   (defaults: runs/walkthrough, 50)"
case "${1:-}" in
  -h | --help)
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
    ;;
  -*)
    echo "error: unknown flag $1; $usage" >&2
    exit 2
    ;;
esac
W="${1:-runs/walkthrough}"
STEPS="${2:-50}"
if [ "$#" -gt 2 ]; then
  echo "error: at most two arguments; $usage" >&2
  exit 2
fi
if ! [[ "$STEPS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: STEPS must be a positive integer, got '$STEPS'; $usage" >&2
  exit 2
fi
# shellcheck source=scripts/_setup_python.sh
source "$ROOT/scripts/_setup_python.sh"
set -x
# 0. a few short videos with sound (use your own talking-head clips for anything real)
"$PY" -m data.sample_data --out_dir "$W/sample" --talking_videos "${WALK_VIDEOS:-4}" --overwrite \
    --video_seconds "${WALK_SECONDS:-1.5}"
# 1. data: an HDTF-style tree for MToV, LRS3-style clips for AToM (random networks, synthetic BFM;
#    --hubert_dim 16 is the feature width of configs/atom_tiny.yaml)
"$PY" -m data.preprocess hdtf --videos "$W/sample/videos" --out_dir "$W/hdtf" --random_weights
"$PY" -m data.preprocess lrs3 --root "$W/sample/videos" --out_dir "$W/lrs3" --random_weights --hubert_dim 16
# 2. AToM
"$PY" -m AToM.train --config configs/atom_tiny.yaml --device cpu --out_dir "$W/atom" \
    data.root="$W/lrs3" train.max_steps="$STEPS"
# 3. the RGB autoencoder, then the landmark autoencoder initialised from it
"$PY" -m MToV.train_autoencoder --config configs/mtov_autoencoder_tiny.yaml --device cpu \
    --out_dir "$W/ae_rgb" data.root="$W/hdtf" train.max_steps="$STEPS"
"$PY" -m MToV.train_autoencoder --config configs/mtov_autoencoder_tiny.yaml --device cpu --mode ldmk \
    --init_from "$W/ae_rgb/model_last.pth" --out_dir "$W/ae_ldmk" data.root="$W/hdtf" train.max_steps="$STEPS"
# 4. the diffusion UNet on the frozen autoencoders
"$PY" -m MToV.train_diffusion --config configs/mtov_tiny.yaml --device cpu \
    --ae_rgb "$W/ae_rgb/model_last.pth" --ae_ldmk "$W/ae_ldmk/model_last.pth" \
    --out_dir "$W/unet" data.root="$W/hdtf" train.max_steps="$STEPS"
# 5. the whole pipeline with the trained tiny checkpoints (random stand-ins for the rest)
"$PY" -m pipeline.inference --config configs/inference_tiny.yaml --random_weights --overwrite \
    --audio "$W/sample/speech.wav" --ref_video "$W/sample/reference.mp4" --out "$W/talk.mp4" --preview \
    assets.atom="$(ls "$W"/atom/checkpoints/step_*.pt | tail -n 1)" \
    assets.autoencoder_rgb="$W/ae_rgb/model_last.pth" assets.autoencoder_motion="$W/ae_ldmk/model_last.pth" \
    assets.diffusion_model="$W/unet/diffusion_model.pth"
