#!/usr/bin/env bash
# LoRA on a GPTQ int8 base (Qwen-14B-Chat-Int8).
# Hardware: 1 x RTX 3090 24GB. Needs: a CUDA build of auto-gptq/gptqmodel and optimum.
set -euo pipefail
CUDA_VISIBLE_DEVICES=0 \
martlet sft \
    --model_type qwen-14b-chat-int8 \
    --trust_remote_code true \
    --sft_type lora \
    --dataset blossom-math-zh \
    --max_length 2048 \
    --batch_size 1 \
    --output_dir output
