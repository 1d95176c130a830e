#!/usr/bin/env bash
# Encode every training window of HDTF once with the frozen MToV autoencoders: the latent cache that
# scripts/train_mtov_diffusion.sh reads with data.latents=DIR (about 10x faster training steps).
#
#   scripts/cache_mtov_latents.sh --ae_rgb checkpoints/autoencoder_rgb.pth --ae_ldmk checkpoints/autoencoder_motion.pth \
#       data.root=data/train/HDTF data.split_file=data/train/HDTF/test_ids.txt --out data/train/HDTF_latents
#   ... --stride 2 --dtype bf16            # every 2nd window start, bf16 storage (a quarter of the disk)
#   NUM_PROCESSES=8 scripts/cache_mtov_latents.sh ...        # 8 GPUs, each encoding its own videos
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=HOST NUM_PROCESSES=16 scripts/cache_mtov_latents.sh ...
#   scripts/cache_mtov_latents.sh --num_shards 4 --shard K ...   # 4 independent jobs (K = 0..3), one folder
#
# Prints the disk the cache needs before it starts. Rerunning the same command resumes (videos already
# built are kept; a video a killed run left half-written is rebuilt). Use the same --config and data.*
# settings as the training run: training refuses a cache built from other autoencoders or settings.
# Launcher variables: scripts/_train.sh. All flags: python -m MToV.cache_latents --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODITALKER_PROG="scripts/${0##*/}"  # the name its usage line shows
exec "$ROOT/scripts/_train.sh" MToV.cache_latents --config "${CONFIG:-$ROOT/configs/mtov_diffusion.yaml}" "$@"
