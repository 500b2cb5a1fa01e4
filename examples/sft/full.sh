#!/usr/bin/env bash
# Full fine-tuning of Qwen1.5-7B-Chat on one GPU.
# Hardware: 1 x A100 80GB (about 70 GB).
set -euo pipefail
CUDA_VISIBLE_DEVICES=0 \
martlet sft \
    --model_type qwen1half-7b-chat \
    --sft_type full \
    --dataset alpaca-zh#20000 alpaca-en#20000 \
    --max_length 2048 \
    --learning_rate 1e-5 \
    --batch_size 1 \
    --gradient_accumulation_steps 16 \
    --use_flash_attn true \
    --output_dir output
