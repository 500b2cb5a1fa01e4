#!/usr/bin/env bash
# Full fine-tuning of Qwen-7B-Chat split across two GPUs (model parallel: the layers are spread over the
# visible GPUs with device_map, one process).
# Hardware: 2 x A100 80GB.
set -euo pipefail
CUDA_VISIBLE_DEVICES=0,1 \
martlet sft \
    --model_type qwen-7b-chat \
    --trust_remote_code true \
    --sft_type full \
    --dataset blossom-math-zh \
    --max_length 2048 \
    --learning_rate 1e-5 \
    --batch_size 1 \
    --output_dir output
