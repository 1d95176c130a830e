#!/usr/bin/env bash
# Demo on a fresh machine: set up .venv, write the bundled sample inputs (espeak-ng speech clip +
# the public-domain scikit-image astronaut as a moving reference video), run the main job.
# With every official checkpoint in checkpoints/ it uses them (configs/inference.yaml); otherwise
# it runs with --random_weights and the tiny config (a loud warning says so: the video is then
# not a talking head, it only shows that the pipeline runs).
#   scripts/demo.sh [extra flags or key=value for pipeline.inference]
#   OUT_DIR=outputs/demo scripts/demo.sh --device cuda
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT_DIR:-$ROOT/outputs/demo}"
start=$(date +%s)

# shellcheck source=scripts/_setup_python.sh
source "$ROOT/scripts/_setup_python.sh"
# shellcheck source=scripts/_allocator.sh
source "$ROOT/scripts/_allocator.sh"
mkdir -p "$OUT_DIR"

echo "[demo] writing sample inputs to $OUT_DIR/inputs"
"$PY" -m data.sample_data --out_dir "$OUT_DIR/inputs" --video_seconds 2 --overwrite >/dev/null

ASSETS=(hubert face_alignment deep3d bfm_front bfm_similarity atom autoencoder_rgb autoencoder_motion diffusion_model)
if "$PY" -m moditalker.assets check --only "${ASSETS[@]}" >/dev/null 2>&1; then
  echo "[demo] official checkpoints found: full models (configs/inference.yaml)"
  MODE=(--config "$ROOT/configs/inference.yaml")
else
  echo "[demo] some checkpoints are missing (python -m moditalker.assets check lists them):"
  echo "[demo] running with --random_weights and configs/inference_tiny.yaml instead"
  MODE=(--config "$ROOT/configs/inference_tiny.yaml" --random_weights)
fi

"$PY" -m pipeline.inference \
  --audio "$OUT_DIR/inputs/speech.wav" \
  --ref_video "$OUT_DIR/inputs/reference.mp4" \
  --out "$OUT_DIR/demo.mp4" \
  --preview --overwrite "${MODE[@]}" "$@"

echo "[demo] done in $(( $(date +%s) - start )) s"
echo "[demo] video:   $OUT_DIR/demo.mp4"
echo "[demo] preview: $OUT_DIR/demo_preview.mp4 (landmarks | generated)"
