#!/usr/bin/env bash
# QLoRA with bitsandbytes: Qwen1.5-14B-Chat loaded in 4-bit NF4 (double quantization), LoRA on top.
# Hardware: 1 x RTX 3090 24GB. Needs: pip install "martlet[bnb]".
set -euo pipefail
CUDA_VISIBLE_DEVICES=0 \
martlet sft \
    --model_type qwen1half-14b-chat \
    --sft_type lora \
    --quantization_bit 4 \
    --bnb_4bit_quant_type nf4 \
    --bnb_4bit_use_double_quant true \
    --lora_target_modules ALL \
    --dataset blossom-math-zh \
    --max_length 2048 \
    --batch_size 1 \
    --output_dir output
