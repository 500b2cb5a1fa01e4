#!/usr/bin/env bash
# LoRA with DDP over two GPUs (one process per GPU, torchrun started by martlet).
# Hardware: 2 x RTX 3090 24GB.
set -euo pipefail
NPROC_PER_NODE=2 \
CUDA_VISIBLE_DEVICES=0,1 \
martlet sft \
    --model_type qwen1half-7b-chat \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset alpaca-zh#20000 \
    --max_length 2048 \
    --batch_size 1 \
    --output_dir output
