#!/usr/bin/env bash
# Hardware: any CPU.
# GRPO with LoRA on the embedded SmolLM2: the built-in one-digit arithmetic word problems, rewarded for the right
# final number (accuracy), with Dr. GRPO's loss (the paper's per-sequence mean let replies grow to the length cap).
# About 2.5 minutes for 16 steps on a 2-core CPU. Then score the base model and the checkpoint side by side on
# held-out questions of the same kind (measured: 13/60 -> 28-41/60, four seeds):
#   martlet eval --ckpt_dir output/.../checkpoint-16 --eval_base true --eval_dataset math-small-en \
#       --eval_limit 60 --answer_instruction true --max_new_tokens 48
set -euo pipefail
OUTPUT_DIR="${OUTPUT_DIR:-output}"
martlet grpo \
    --model_type smollm2-135m-instruct \
    --sft_type lora \
    --lora_target_modules ALL \
    --dataset math-word-problems-small-en#400 \
    --reward_funcs accuracy \
    --loss_type dr_grpo \
    --num_generations 8 \
    --max_completion_length 48 \
    --temperature 0.7 \
    --beta 0 \
    --batch_size 24 \
    --gradient_accumulation_steps 1 \
    --learning_rate 5e-4 \
    --lr_scheduler_type constant \
    --warmup_ratio 0 \
    --max_steps "${MAX_STEPS:-16}" \
    --log_completions_steps 5 \
    --output_dir "$OUTPUT_DIR"
