"""Standard suites (gsm8k, mmlu, ceval, cmmlu) through lm-evaluation-harness, the `eval-harness` extra.

Why lm-evaluation-harness rather than EvalScope: it is the de-facto standard (the Open LLM Leaderboard's numbers
come from it, so results compare with published ones), it installs with pip alone, and it evaluates a local
transformers model with a PEFT adapter on top directly. Its task data comes from the Hugging Face hub, so
these suites need a network; `check_harness` says so before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from typing import Optional, Sequence
from urllib.parse import urlparse

from martlet.errors import MartletError

# our suite name -> the lm-eval task (group) name
TASKS = {"gsm8k": "gsm8k", "mmlu": "mmlu", "ceval": "ceval-valid", "cmmlu": "cmmlu"}
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 5.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout):
            return True
    except OSError:
        return False


def check_harness(suites: Sequence[str]) -> None:
    """MartletError when standard suites are asked for but cannot run: offline, or lm-eval not installed."""
    if not suites:
        return
    names = ", ".join(suites)
    offline = [name for name in _OFFLINE_VARIABLES if os.environ.get(name, "").strip().lower() in _TRUE]
    if offline:
        raise MartletError(f"suite(s) {names} download their data from the hub, but {offline[0]}=1 (offline).",
                           field="eval_dataset", hint=f"Unset {offline[0]} on a machine with a network, or "
                                                      "evaluate offline on the built-in suites (math-easy-en, "
                                                      "math-en, math-zh, self-cognition).")
    if importlib.util.find_spec("lm_eval") is None:
        raise MartletError(f"suite(s) {names} run through lm-evaluation-harness, not installed here.",
                           field="eval_dataset", hint="Install it with: pip install 'martlet[eval-harness]'")
    if not _hub_reachable():
        raise MartletError(f"suite(s) {names} download their data from the hub, which cannot be reached.",
                           field="eval_dataset", hint="Connect to a network (or set HF_ENDPOINT to a mirror), or "
                                                      "evaluate offline on the built-in suites.")


def _score(task_result: dict) -> float:
    """The task's accuracy: exact match for generation tasks (gsm8k), else acc."""
    for prefix in ("exact_match,flexible-extract", "exact_match", "acc,", "acc"):
        for key, value in task_result.items():
            if key.startswith(prefix) and "stderr" not in key and isinstance(value, (int, float)):
                return float(value)
    raise MartletError(f"lm-eval returned no accuracy among {sorted(task_result)}.", field="eval_dataset")


def run_harness(suites: Sequence[str], model_dir: str, *, adapter_dir: Optional[str], tokenizer_dir: Optional[str],
                limit: Optional[int], batch_size: int) -> dict[str, dict]:
    """{suite: {accuracy, correct, total}} for a local model (plus a LoRA adapter), through lm_eval."""
    import lm_eval

    model_args = f"pretrained={model_dir},tokenizer={tokenizer_dir or model_dir}"
    if adapter_dir:
        model_args += f",peft={adapter_dir}"
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=[TASKS[s] for s in suites],
                                  limit=limit, batch_size=batch_size, apply_chat_template=True)
    scores = {}
    for suite in suites:
        task = TASKS[suite]
        accuracy = _score(out["results"][task])
        total = int(out.get("n-samples", {}).get(task, {}).get("effective", limit or 0))
        scores[suite] = {"accuracy": accuracy, "correct": round(accuracy * total), "total": total}
    return scores
