#!/usr/bin/env bash
# LoRA on all linear layers of Qwen1.5-7B-Chat.
# Hardware: 1 x RTX 3090 / A10 24GB (about 20 GB with gradient checkpointing).
set -euo pipefail
CUDA_VISIBLE_DEVICES=0 \
martlet sft \
    --model_type qwen1half-7b-chat \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset alpaca-zh#5000 self-cognition#500 \
    --model_name 小黄 "Xiao Huang" \
    --model_author 魔搭 ModelScope \
    --max_length 2048 \
    --learning_rate 1e-4 \
    --batch_size 1 \
    --gradient_checkpointing true \
    --output_dir output
