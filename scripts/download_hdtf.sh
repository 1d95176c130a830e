#!/usr/bin/env bash
# HDTF from its own metadata (the HDTF_dataset folder of github.com/MRzzm/HDTF): each video downloaded
# once with yt-dlp, every annotated interval cut into OUT/{subset}_{name}_{k:03d}.mp4 (25 fps, audio kept,
# exact to a frame, the crop_wh face window resized to 512x512), ready for scripts/preprocess_hdtf.sh.
#
#   scripts/download_hdtf.sh --metadata HDTF/HDTF_dataset --out data/HDTF/videos
#   scripts/download_hdtf.sh --metadata HDTF/HDTF_dataset --out data/HDTF/videos --subsets RD --jobs 8 --keep_raw
#
# Resumable (finished clips are kept; a re-run fetches only what is missing). Prints a report (also
# OUT/download_report.json); exit 2 when a video could not be downloaded or cut, after all the others.
# All flags: --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/_python.sh
source "$ROOT/scripts/_python.sh"
exec "$PY" -m data.hdtf_download "$@"
