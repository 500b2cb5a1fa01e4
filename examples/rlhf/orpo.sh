#!/usr/bin/env bash
# ORPO (no reference model) with LoRA on Llama-3-8B-Instruct.
# Hardware: 1 x A100 40GB.
set -euo pipefail
CUDA_VISIBLE_DEVICES=0 \
martlet orpo \
    --model_type llama3-8b-instruct \
    --sft_type lora \
    --dataset pref-math \
    --beta 0.1 \
    --max_length 1024 \
    --batch_size 1 \
    --output_dir output
