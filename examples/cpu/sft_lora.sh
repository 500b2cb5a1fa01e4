#!/usr/bin/env bash
# LoRA on the embedded SmolLM2-135M-Instruct: teach it a new name, keep it answering other questions.
# Hardware: any CPU (2 cores: about 4 minutes for 80 steps). No download: the model ships with Martlet.
set -euo pipefail
martlet sft \
    --model_type smollm2-135m-instruct \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset self-cognition#240 general-instruct#120 \
    --model_name 小鹦 Martlet \
    --model_author 鸟社 Birdhouse \
    --max_steps "${MAX_STEPS:-80}" \
    --batch_size 4 \
    --gradient_accumulation_steps 1 \
    --learning_rate 2e-4 \
    --eval_steps 40 \
    --output_dir "${OUTPUT_DIR:-output}"
