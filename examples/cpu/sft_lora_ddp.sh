#!/usr/bin/env bash
# The same LoRA run with DDP: two processes (gloo on a CPU, NCCL on GPUs) started through torchrun by martlet.
# Hardware: a CPU with 2+ cores, or 2 GPUs.
set -euo pipefail
NPROC_PER_NODE=2 \
martlet sft \
    --model_type smollm2-135m-instruct \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset self-cognition#240 general-instruct#120 \
    --model_name 小鹦 Martlet \
    --model_author 鸟社 Birdhouse \
    --max_steps "${MAX_STEPS:-80}" \
    --batch_size 2 \
    --gradient_accumulation_steps 1 \
    --learning_rate 2e-4 \
    --eval_steps 40 \
    --output_dir "${OUTPUT_DIR:-output}"
