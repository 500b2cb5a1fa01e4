#!/usr/bin/env bash
# The CUDA paths that CPU CI cannot run, in a few minutes on one GPU, on the embedded SmolLM2 and built-in
# data (no network). One PASS/FAIL/SKIP line per check; exits non-zero when any check fails.
#   bash scripts/gpu_check.sh            (PY=path/to/python to use another interpreter)
set -u
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
fail=0
check() {  # check NAME COMMAND...
  local name=$1; shift
  local start=$SECONDS
  if "$@" >"$WORK/$name.log" 2>&1; then echo "PASS $name ($((SECONDS - start)) s)"
  else echo "FAIL $name ($((SECONDS - start)) s, log below)"; tail -25 "$WORK/$name.log"; fail=1; fi
}
has() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
skip() { echo "SKIP $1 ($2)"; }

$PY -c "import torch; assert torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name(0), 'bf16:', torch.cuda.is_bf16_supported())" \
  || { echo "FAIL no CUDA GPU visible"; exit 1; }

SFT=(-m martlet sft --dataset self-cognition#200 general-instruct#100 --model_name 小鹦 Martlet
     --model_author 鸟社 Birdhouse --max_steps 20 --batch_size 4 --gradient_accumulation_steps 1
     --lora_target_modules ALL --learning_rate 3e-4 --report_to none --eval_steps 10)

check bf16_lora_sft $PY "${SFT[@]}" --dtype bf16 --output_dir "$WORK/bf16"
check fp16_lora_sft $PY "${SFT[@]}" --dtype fp16 --output_dir "$WORK/fp16"
check full_sft $PY "${SFT[@]}" --sft_type full --learning_rate 1e-5 --output_dir "$WORK/full"
if has bitsandbytes; then
  check qlora_4bit $PY "${SFT[@]}" --quantization_bit 4 --output_dir "$WORK/qlora4"
  check qlora_8bit $PY "${SFT[@]}" --quantization_bit 8 --output_dir "$WORK/qlora8"
else skip qlora "bitsandbytes not installed"; fi
if has flash_attn; then check flash_attn $PY "${SFT[@]}" --use_flash_attn true --output_dir "$WORK/fa2"
else skip flash_attn "flash-attn not installed"; fi
check sdpa_attn $PY "${SFT[@]}" --attn_impl sdpa --output_dir "$WORK/sdpa"
check fused_kernels_cuda $PY -m pytest -q tests/unit/test_kernels.py -k cuda  # fused LoRA + loss vs peft on CUDA
check packing $PY "${SFT[@]}" --packing true --output_dir "$WORK/packing"
check padded_batches $PY "${SFT[@]}" --padding_free false --lean_loss false --output_dir "$WORK/padded"
if has liger_kernel; then check liger $PY "${SFT[@]}" --use_liger_kernel true --output_dir "$WORK/liger"
else skip liger "liger-kernel not installed"; fi
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  check ddp_2gpu env NPROC_PER_NODE=2 $PY "${SFT[@]}" --batch_size 2 --output_dir "$WORK/ddp"
  check fsdp_2gpu env NPROC_PER_NODE=2 $PY "${SFT[@]}" --sft_type full --fsdp true --output_dir "$WORK/fsdp"
  check model_parallel_2gpu $PY "${SFT[@]}" --output_dir "$WORK/mp"
else skip ddp_fsdp "one GPU visible (the CPU tests run DDP and FSDP over gloo)"; fi
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 4 ]; then  # two groups of two GPUs
  check model_parallel_x_ddp env NPROC_PER_NODE=2 $PY "${SFT[@]}" --batch_size 2 --output_dir "$WORK/mpddp"
else skip model_parallel_x_ddp "fewer than 4 GPUs (tests/unit/test_placement.py checks the grouping)"; fi
if has deepspeed; then
  check deepspeed_zero2 $PY "${SFT[@]}" --deepspeed default-zero2 --output_dir "$WORK/z2"
  check deepspeed_zero3 $PY "${SFT[@]}" --deepspeed default-zero3 --output_dir "$WORK/z3"
else skip deepspeed "deepspeed not installed"; fi

GRPO=(-m martlet grpo --dataset math-word-problems-small-en#64 --reward_funcs accuracy format --num_generations 4
      --batch_size 8 --gradient_accumulation_steps 1 --max_completion_length 48 --max_steps 4
      --lora_target_modules ALL --report_to none --dtype bf16)
check grpo_bf16 $PY "${GRPO[@]}" --beta 0.04 --output_dir "$WORK/grpo"
if has bitsandbytes; then check grpo_qlora $PY "${GRPO[@]}" --quantization_bit 4 --output_dir "$WORK/grpo_q4"
else skip grpo_qlora "bitsandbytes not installed"; fi
if has vllm; then
  check grpo_vllm_colocate $PY "${GRPO[@]}" --use_vllm true --vllm_gpu_memory_utilization 0.3 \
    --output_dir "$WORK/grpo_vllm"
else skip grpo_vllm "vllm not installed"; fi

CKPT=$(ls -d "$WORK"/bf16/*/v*/checkpoint-* 2>/dev/null | tail -1)
if [ -n "$CKPT" ]; then
  check infer_transformers $PY -m martlet infer --ckpt_dir "$CKPT" --dataset general-instruct#16 \
    --dataset_test_ratio 0 --max_new_tokens 32
  if has vllm; then
    check merge_lora $PY -m martlet merge-lora --ckpt_dir "$CKPT"
    check infer_vllm $PY -m martlet infer --ckpt_dir "$CKPT-merged" --infer_backend vllm \
      --dataset general-instruct#16 --dataset_test_ratio 0 --max_new_tokens 32
  else skip infer_vllm "vllm not installed"; fi
else skip infer "no checkpoint from bf16_lora_sft"; fi

if [ -f scripts/gpu_check_export.sh ]; then
  PY=$PY bash scripts/gpu_check_export.sh || fail=1
fi
exit $fail
