#!/usr/bin/env bash
# LoRA on a GPTQ int4 base (Qwen1.5-14B-Chat-GPTQ-Int4): the spec calls this qlora(gptq-int4).
# Hardware: 1 x RTX 3090 24GB. Needs: a CUDA build of auto-gptq/gptqmodel and optimum.
set -euo pipefail
CUDA_VISIBLE_DEVICES=0 \
martlet sft \
    --model_type qwen1half-14b-chat-int4 \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset blossom-math-zh \
    --max_length 2048 \
    --batch_size 1 \
    --output_dir output
