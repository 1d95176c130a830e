#!/usr/bin/env bash
# Re-pose AToM's frontal landmarks onto a reference video and render landmark dots for MToV.
#
#   scripts/align_motion.sh --landmarks outputs/atom/frontal_lm3d.npy --reference ref.mp4 --out_dir outputs/aligned
#   scripts/align_motion.sh --landmarks lm.npy --reference frames_folder/ --out_dir out --audio speech.wav
#   scripts/align_motion.sh --landmarks lm.npy --reference ref.mp4 --out_dir out --random_weights  # no weights
#
# Writes out_dir/aligned_lm68.npy (int64 [T, 68, 2] pixels in the --size crop of the reference),
# landmarks_png/%05d.png, landmarks.mp4, reference_{lm68,coeff,index}.npy and config.yaml.
# Weights: checkpoints/{BFM,deep3d,face_alignment} (see `python -m moditalker.assets check`). All flags: --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_python.sh
source "$ROOT/scripts/_python.sh"
exec "$PY" -m data.motion_align "$@"
