#!/usr/bin/env bash
# Evaluate a checkpoint on the rows held out from its own training data (add nothing else to chat).
# Hardware: any CPU. CKPT: a checkpoint folder.
set -euo pipefail
: "${CKPT:?set CKPT to a checkpoint folder}"
martlet infer \
    --ckpt_dir "$CKPT" \
    --load_dataset_config true \
    --val_dataset_sample "${ROWS:-10}" \
    --max_new_tokens 64
