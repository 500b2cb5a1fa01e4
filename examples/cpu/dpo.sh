#!/usr/bin/env bash
# DPO with LoRA on the embedded SmolLM2: prefer replies that give the new name over ones that do not.
# Hardware: any CPU.
set -euo pipefail
martlet dpo \
    --model_type smollm2-135m-instruct \
    --sft_type lora \
    --dataset pref-identity \
    --model_name 小鹦 Martlet \
    --model_author 鸟社 Birdhouse \
    --beta 0.1 \
    --max_steps "${MAX_STEPS:-60}" \
    --batch_size 4 \
    --gradient_accumulation_steps 1 \
    --learning_rate 2e-4 \
    --output_dir "${OUTPUT_DIR:-output}"
