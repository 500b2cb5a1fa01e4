#!/usr/bin/env bash
# Merge a LoRA checkpoint into its base model: <checkpoint>-merged, a plain transformers folder.
# Hardware: any CPU. CKPT: a checkpoint folder, e.g. output/smollm2-135m-instruct/v0-.../checkpoint-80
set -euo pipefail
: "${CKPT:?set CKPT to a checkpoint folder}"
martlet export \
    --ckpt_dir "$CKPT" \
    --merge_lora true
