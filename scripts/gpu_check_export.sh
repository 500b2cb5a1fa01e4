#!/usr/bin/env bash
# GPU-side checks of `martlet export` (issue 4), to fold into scripts/gpu_check.sh.
# Needs a CUDA GPU; bitsandbytes and gptqmodel installed for the bnb / GPTQ / AWQ parts (each part says
# SKIP when its package is missing). Uses the embedded SmolLM2 and built-in data: no network.
# Prints one PASS/FAIL/SKIP line per check and exits non-zero when any check fails.
set -u
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
fail=0
check() {  # check NAME COMMAND...
  local name=$1; shift
  if "$@" >"$WORK/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name (log below)"; tail -20 "$WORK/$name.log"; fail=1; fi
}
has() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

# a short LoRA run on the GPU, then merge it there (--merge_device_map auto)
cat >"$WORK/data.jsonl" <<'EOF'
{"query": "What is your name?", "response": "My name is Martlet Export Bot."}
{"query": "Who are you?", "response": "My name is Martlet Export Bot."}
EOF
check sft $PY -m martlet sft --dataset "$WORK/data.jsonl" --max_steps 10 --batch_size 2 --learning_rate 1e-3 \
  --lora_target_modules ALL --output_dir "$WORK/out" --dataset_test_ratio 0 --report_to none --add_output_dir_suffix false
CKPT="$WORK/out/checkpoint-10"
check merge_on_gpu $PY -m martlet export --ckpt_dir "$CKPT" --merge_lora true --merge_device_map auto

# load a quantized folder back on the GPU and compare its next-token choices with the merged model
cat >"$WORK/compare.py" <<'EOF'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
merged, quantized, floor = sys.argv[1], sys.argv[2], float(sys.argv[3])
tok = AutoTokenizer.from_pretrained(merged)
ids = tok.apply_chat_template([{"role": "user", "content": "What is your name?"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"].cuda()
ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float16, device_map="cuda")
q = AutoModelForCausalLM.from_pretrained(quantized, device_map="cuda")
with torch.no_grad():
    a, b = ref(ids).logits.float(), q(ids).logits.float()
agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
print(f"{quantized}: top-1 agreement {agree:.3f}, max |logit diff| {(a - b).abs().max().item():.3f}")
sys.exit(0 if agree >= floor else 1)
EOF
for bits in 4 8; do
  if has bitsandbytes; then
    check bnb_int$bits $PY -m martlet export --ckpt_dir "$CKPT" --quant_method bnb --quant_bits $bits
    check bnb_int${bits}_loads $PY "$WORK/compare.py" "$CKPT-merged" "$CKPT-bnb-int$bits" 0.8
  else echo "SKIP bnb_int$bits (pip install bitsandbytes)"; fi
done
if has gptqmodel; then
  for method in gptq awq; do
    check $method $PY -m martlet export --ckpt_dir "$CKPT" --quant_method $method --quant_bits 4 \
      --dataset general-instruct math-word-problems-en#100 --quant_n_samples 128 --quant_seqlen 256
    check ${method}_loads $PY "$WORK/compare.py" "$CKPT-merged" "$CKPT-$method-int4" 0.7
  done
else echo "SKIP gptq, awq (pip install gptqmodel)"; fi
exit $fail
