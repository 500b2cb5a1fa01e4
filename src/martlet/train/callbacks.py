"""Trainer callbacks: logging.jsonl and a last save at the last step (each checkpoint's run files are the
trainer's: `AtomicCheckpointMixin`)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class JsonlLogger(TrainerCallback, ExportableState):
    """Appends every log (loss, lr, eval) with step, epoch and elapsed time to logging.jsonl.

    The elapsed time is saved in each checkpoint's trainer_state.json (an `ExportableState`), so a resumed run
    counts on from the checkpoint's value. The run's summary (train_runtime, ...) is one line: a resumed run's
    replaces the one its interrupted part wrote."""

    def __init__(self, path: str):
        self.path = path
        self.start = time.time()

    def state(self) -> dict[str, Any]:
        return {"args": {"path": self.path}, "attributes": {"elapsed_s": round(time.time() - self.start, 2)}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        saved = saved[-1] if isinstance(saved, list) else saved
        if state.global_step > 0 and saved:  # resumed: go on from the checkpoint's elapsed time
            self.start = time.time() - saved["attributes"]["elapsed_s"]
        state.stateful_callbacks[type(self).__name__] = self.state()  # (checkpoints saved before had none)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "max_steps": state.max_steps, "epoch": round(state.epoch or 0, 4),
                  **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))},
                  "elapsed_s": round(time.time() - self.start, 2)}
        if SUMMARY_KEY in record:
            _drop_summaries(self.path)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


SUMMARY_KEY = "train_runtime"  # the key of the line the Trainer logs when training ends


def _drop_summaries(path: str) -> None:
    """Remove the summary lines an interrupted part of the run wrote (its lines past the resumed checkpoint were
    cut already; this one is at the checkpoint's step)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip() and SUMMARY_KEY not in json.loads(line)]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


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


def training_callbacks(run_dir: str, has_eval: bool) -> list[TrainerCallback]:
    """The callbacks of every training command: logging.jsonl in the run folder, and the last step's save."""
    return [JsonlLogger(os.path.join(run_dir, "logging.jsonl")), FinalStep(has_eval)]
