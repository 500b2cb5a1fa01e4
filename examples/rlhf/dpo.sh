#!/usr/bin/env bash
# DPO with LoRA on Qwen1.5-7B-Chat (the reference model is the base with the adapter switched off).
# Hardware: 1 x A100 40GB.
set -euo pipefail
CUDA_VISIBLE_DEVICES=0 \
martlet dpo \
    --model_type qwen1half-7b-chat \
    --sft_type lora \
    --dataset pref-math \
    --beta 0.1 \
    --max_length 1024 \
    --batch_size 1 \
    --output_dir output
