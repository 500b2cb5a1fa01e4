#!/usr/bin/env bash
# ORPO (SFT and preference in one loss, no reference model) with LoRA on the embedded SmolLM2.
# Hardware: any CPU.
set -euo pipefail
martlet orpo \
    --model_type smollm2-135m-instruct \
    --sft_type lora \
    --dataset pref-math-en#200 \
    --beta 0.1 \
    --max_steps "${MAX_STEPS:-60}" \
    --batch_size 4 \
    --gradient_accumulation_steps 1 \
    --learning_rate 2e-4 \
    --output_dir "${OUTPUT_DIR:-output}"
