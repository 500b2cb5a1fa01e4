#!/usr/bin/env bash
# LoRA on Qwen1.5-14B-Chat with DDP over 4 GPUs and DeepSpeed ZeRO-3.
# Hardware: 4 x RTX 3090 24GB. Needs: pip install "martlet[deepspeed]".
set -euo pipefail
NPROC_PER_NODE=4 \
CUDA_VISIBLE_DEVICES=0,1,2,3 \
martlet sft \
    --model_type qwen1half-14b-chat \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset alpaca-zh#20000 \
    --max_length 2048 \
    --batch_size 1 \
    --deepspeed default-zero3 \
    --output_dir output
