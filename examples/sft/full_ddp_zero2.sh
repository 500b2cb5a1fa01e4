#!/usr/bin/env bash
# Full fine-tuning of Qwen-7B-Chat with DDP over 4 GPUs and DeepSpeed ZeRO-2.
# Hardware: 4 x A100 80GB. Needs: pip install "martlet[deepspeed]".
set -euo pipefail
NPROC_PER_NODE=4 \
CUDA_VISIBLE_DEVICES=0,1,2,3 \
martlet sft \
    --model_type qwen-7b-chat \
    --trust_remote_code true \
    --sft_type full \
    --dataset blossom-math-zh \
    --max_length 2048 \
    --learning_rate 2e-5 \
    --batch_size 1 \
    --deepspeed default-zero2 \
    --output_dir output
