#!/usr/bin/env bash
# Serve a checkpoint over the OpenAI-compatible API on 127.0.0.1 (add --api_key to require a key).
# Hardware: any CPU. CKPT: a checkpoint folder. Try: curl http://127.0.0.1:8000/v1/models
set -euo pipefail
: "${CKPT:?set CKPT to a checkpoint folder}"
martlet deploy \
    --ckpt_dir "$CKPT" \
    --port "${PORT:-8000}"
