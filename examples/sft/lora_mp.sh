#!/usr/bin/env bash
# LoRA on Yi-34B-Chat across two GPUs (model parallel: device_map spreads the layers, one process).
# Hardware: 2 x A100 80GB (or 4 x 3090 with CUDA_VISIBLE_DEVICES=0,1,2,3).
set -euo pipefail
CUDA_VISIBLE_DEVICES=0,1 \
martlet sft \
    --model_type yi-34b-chat \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset alpaca-zh#10000 \
    --max_length 2048 \
    --batch_size 1 \
    --output_dir output
