#!/usr/bin/env bash
# Train a pixel-space DiT-B/8 on Tiny ImageNet (200 classes, 64×64): the Flax original's recipe
# (`--model.preset big --model.patch_size 8`, batch 64, no VAE).
#
#   ./experiments/train_tiny_imagenet.sh                        # stream Maysee/tiny-imagenet from the Hub
#   DATA=data/tiny-imagenet ./experiments/train_tiny_imagenet.sh # a local copy, made once with
#       hf download Maysee/tiny-imagenet --repo-type dataset --local-dir data/tiny-imagenet
#   ./experiments/train_tiny_imagenet.sh --max_steps 2000        # extra flags go to train_flow.py
#
# Runs for 1M steps by default (the original's). Ctrl-C saves a checkpoint; resume with
#   ./experiments/train_tiny_imagenet.sh --load_dir runs/tiny-imagenet
# The data order is a function of (seed, step), so the resumed run sees what the uninterrupted one would have.
set -euo pipefail
cd "$(dirname "$0")/.."

data_flags=()
if [[ -n "${DATA:-}" ]]; then
    data_flags=(--dataset_path "$DATA")
fi

exec python experiments/train_flow.py \
    --dataset_name tiny-imagenet \
    ${data_flags[@]+"${data_flags[@]}"} \
    --batch_size 64 \
    --model.preset big \
    --model.patch_size 8 \
    --model.use_stable_vae 0 \
    --save_dir "${SAVE_DIR:-runs/tiny-imagenet}" \
    --wandb.name DiT-B8-tiny-imagenet \
    "$@"
