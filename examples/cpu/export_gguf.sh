#!/usr/bin/env bash
# Export a (LoRA) checkpoint to a GGUF file for llama.cpp, with an Ollama Modelfile beside it.
# Hardware: any CPU. CKPT: a checkpoint folder.
set -euo pipefail
: "${CKPT:?set CKPT to a checkpoint folder}"
martlet export \
    --ckpt_dir "$CKPT" \
    --merge_lora true \
    --quant_method gguf \
    --gguf_type q8_0 \
    --to_ollama true
