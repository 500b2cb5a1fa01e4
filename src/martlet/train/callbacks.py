"""Trainer callbacks: logging.jsonl, run files in every checkpoint, a last save at the last step."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from transformers import TrainerCallback

from martlet.train.outputs import save_run_files


class JsonlLogger(TrainerCallback):
    """Appends every log (loss, lr, eval) with step, epoch and elapsed time to logging.jsonl."""

    def __init__(self, path: str):
        self.path = path
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "max_steps": state.max_steps, "epoch": round(state.epoch or 0, 4),
                  **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))},
                  "elapsed_s": round(time.time() - self.start, 2)}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


class RunFilesInCheckpoint(TrainerCallback):
    """Writes the arguments and run info into each checkpoint, so `--ckpt_dir` alone is enough later."""

    def __init__(self, args: Any, info: dict[str, Any]):
        self.run_args = args
        self.info = info

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                save_run_files(folder, self.run_args, self.info)


class FinalStep(TrainerCallback):
    """Evaluate and save at the last step too, whatever eval_steps/save_steps say."""

    def __init__(self, has_eval: bool):
        self.has_eval = has_eval

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
            control.should_log = True
            control.should_evaluate = self.has_eval
        return control
