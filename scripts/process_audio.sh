#!/usr/bin/env bash
# HuBERT features for AToM: 16 kHz mono audio -> float32 [T, 1024] at 50 Hz (T = (N - 80) // 320).
#
#   scripts/process_audio.sh --audio speech.wav [more files or folders] --out_dir outputs/hubert
#   scripts/process_audio.sh --audio clip.mp4 --out outputs/hubert/clip.npy --wav_dir outputs/audio16k
#   scripts/process_audio.sh --audio speech.wav --random_weights        # smoke test, no weights
#
# Weights: checkpoints/hubert-large-ls960-ft (see `python -m moditalker.assets check --only hubert`),
# or --model <folder or hub id> [--allow_download]. All flags: --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_python.sh
source "$ROOT/scripts/_python.sh"
exec "$PY" -m data.audio "$@"
