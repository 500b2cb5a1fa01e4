"""What every Martlet trainer adds to transformers' Trainer: whole checkpoints only, and a clean stop.

- A checkpoint is written into `.tmp-checkpoint-<step>/` and renamed into place, so a run killed at any
  moment leaves only whole `checkpoint-<step>` folders (the library's own save is reused as it is).
- SIGINT/SIGTERM during training finish the current step, save a checkpoint and stop; the caller
  reports how to resume.

Tested with transformers 5.24 (`Trainer._save_checkpoint`, `trainer_utils.rotate_checkpoints`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from typing import Any, Iterator

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from martlet.train.outputs import save_run_files
from martlet.utils import follow_umask

logger = logging.getLogger("martlet")
TMP_PREFIX = ".tmp-checkpoint-"


class AtomicCheckpointMixin:
    """Mix into a Trainer subclass: checkpoints appear whole or not at all."""

    martlet_run_args: Any = None
    martlet_run_info: dict[str, Any] | None = None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:  # transformers' hook
        run_dir = self._get_output_dir(trial=trial)
        step = self.state.global_step
        final = os.path.join(run_dir, f"checkpoint-{step}")
        staging_root = os.path.join(run_dir, f"{TMP_PREFIX}{step}")
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part (RNG state, sharded optimizer)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        staged = os.path.join(staging_root, f"checkpoint-{step}")
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
            if self.state.best_global_step == step or os.path.isdir(best):
                self.state.best_model_checkpoint = best
        if os.environ.get("MARTLET_FAULT_KILL_IN_SAVE") == str(step):  # fault injection for the tests
            os.kill(os.getpid(), signal.SIGKILL)
        if self.args.should_save:
            from transformers.trainer import TRAINER_STATE_NAME

            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))  # with the final paths
            if self.martlet_run_args is not None:
                save_run_files(staged, self.martlet_run_args, self.martlet_run_info or {})
            if os.path.isdir(final):  # saved again at the same step (e.g. the last one)
                shutil.rmtree(final)
            follow_umask(staged)  # safetensors writes its files 0600
            os.replace(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


class MartletTrainer(AtomicCheckpointMixin, Trainer):
    """transformers' Trainer with whole-or-nothing checkpoints and, when `lean_loss` is on, the memory-lean
    causal LM loss of `martlet.train.loss` (same value as the library's, without full logits)."""

    lean_loss: bool = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.lean_loss or "labels" not in inputs or self.label_smoother is not None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from martlet.train.loss import causal_lm_loss

        with self.accelerator.autocast():  # the mixed precision accelerate gives a model's own forward
            loss = causal_lm_loss(model, inputs, num_items_in_batch)
        # normalised over the whole accumulated batch when the Trainer counted its tokens (as the library's loss)
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss


class StopOnSignal(TrainerCallback):
    """Turns a SIGINT/SIGTERM into 'save a checkpoint and stop' at the end of the current step."""

    def __init__(self) -> None:
        self.received: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopOnSignal"]:
        """Handle the signals while training runs (main thread only), then restore the old handlers."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            if self.received is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.received = signum
            logger.warning("received %s: saving a checkpoint after this step, then stopping "
                           "(send it again to stop at once).", signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def newest_checkpoint(folder: str) -> str | None:
    """The newest whole checkpoint under `folder` (a run folder, or an output folder holding runs)."""
    found = []
    for root, dirs, _ in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # never a staging folder
        for d in dirs:
            if d.startswith("checkpoint-") and d[11:].isdigit():
                path = os.path.join(root, d)
                if os.path.isfile(os.path.join(path, "trainer_state.json")):
                    found.append(path)
    return max(found, key=lambda p: (os.path.getmtime(os.path.join(p, "trainer_state.json")), p), default=None)


def trim_log(path: str, last_step: int) -> None:
    """Drop log lines past `last_step`: a resumed run does those steps again."""
    import json

    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)
