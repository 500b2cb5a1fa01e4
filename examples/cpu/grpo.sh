#!/usr/bin/env bash
# GRPO with LoRA on the embedded SmolLM2: the built-in English math word problems, rewarded for the right final
# number (accuracy) and for ending with the 'Answer: <number>' line the prompt asks for (format).
# Hardware: any CPU.
set -euo pipefail
martlet grpo \
    --model_type smollm2-135m-instruct \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset math-word-problems-en#400 \
    --reward_funcs accuracy format \
    --num_generations 4 \
    --max_completion_length 32 \
    --temperature 1.0 \
    --beta 0 \
    --batch_size 8 \
    --gradient_accumulation_steps 1 \
    --learning_rate 1e-4 \
    --max_steps "${MAX_STEPS:-40}" \
    --log_completions_steps 5 \
    --output_dir "${OUTPUT_DIR:-output}"
