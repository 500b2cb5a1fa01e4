"""What every Martlet trainer adds to transformers' Trainer: whole checkpoints only, and a clean stop.

- A checkpoint is written into `.tmp-checkpoint-<step>/` and renamed into place, so a run killed at any
  moment leaves only whole `checkpoint-<step>` folders (the library's own save is reused as it is).
- SIGINT/SIGTERM during training finish the current step, save a checkpoint and stop; the caller
  reports how to resume.

The save is the patch `atomic_checkpoint` of `martlet.patches` (transformers' `Trainer._save_checkpoint`,
`trainer_utils.rotate_checkpoints`), guarded there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import signal
import threading
from typing import Any, Iterator

from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import rotate_checkpoints

from martlet import patches
from martlet.train.loss import causal_lm_loss
from martlet.train.outputs import RunFiles
from martlet.utils import follow_umask

logger = logging.getLogger("martlet")
TMP_PREFIX = ".tmp-checkpoint-"
TRAINER_STATE = "trainer_state.json"


class LightStepMixin:
    """The Trainer's bookkeeping between steps without walking the whole model each time: its FLOP estimate counts
    the model's parameters every step (`num_parameters`, 4 ms with LoRA on SmolLM2: ~700 modules walked), and the
    gradient clipping lists every parameter, frozen ones included (5.7 ms against 1.6 for those with a gradient).
    Here the count and the list of parameters are taken once per model; the clipping still reads, each step, which
    parameters have a gradient, so freezing or unfreezing during training clips what the library would. Same
    values as the library's (tests/unit/test_trainer_overhead.py). Single-process runs only: DeepSpeed, FSDP and
    the rest keep accelerate's own clipping."""

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        count = self._per_model("flop_params", lambda model: model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main].numel() * count

    def _clip_grad_norm(self, model: Any) -> Any:
        from accelerate.utils import DistributedType

        if (self.accelerator.distributed_type != DistributedType.NO or self.is_deepspeed_enabled
                or self.is_fsdp_enabled or not hasattr(model, "parameters")):
            return super()._clip_grad_norm(model)
        everything = self._per_model("parameters", lambda m: list(m.parameters()), model)
        return self.accelerator.clip_grad_norm_([p for p in everything if p.grad is not None],
                                                self.args.max_grad_norm)

    def _per_model(self, name: str, compute: Any, model: Any = None) -> Any:
        """compute(model) once per model object (self.model unless given)."""
        model = self.model if model is None else model
        cache = self.__dict__.setdefault("_martlet_per_model", {})
        if name not in cache or cache[name][0] is not model:  # (model, value): a new model object computes anew
            cache[name] = (model, compute(model))
        return cache[name][1]


class AtomicCheckpointMixin(LightStepMixin):
    """Mix into a Trainer subclass: checkpoints appear whole or not at all, each with the run's files
    (`run_files`: the arguments and martlet_run.json, so `--ckpt_dir` alone is enough later; None writes none).
    Every Martlet trainer has it, and with it `LightStepMixin`."""

    def __init__(self, *args: Any, run_files: RunFiles | None = None, **kwargs: Any):
        self.run_files = run_files
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:  # transformers' hook: patch `atomic_checkpoint`
        if not patches.usable("atomic_checkpoint", Trainer, key=Trainer):
            super()._save_checkpoint(model, trial)
            final = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            if self.args.should_save and self.run_files is not None and os.path.isdir(final):
                self.run_files.write(final)
            return None
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
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))  # with the final paths
            if self.run_files is not None:
                self.run_files.write(staged)
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

    def __init__(self, *args: Any, lean_loss: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lean_loss = lean_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.lean_loss or "labels" not in inputs or self.label_smoother is not None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
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


# What a whole checkpoint holds: the name a message gives each part, and the files that are that part
# (DeepSpeed keeps the optimizer and scheduler in global_step*/, FSDP its shards in *_fsdp_*/ and optimizer_*/).
CHECKPOINT_PARTS = (
    ("adapter_model.safetensors (or model*.safetensors)",
     ("adapter_model.safetensors", "adapter_model.bin", "model*.safetensors", "pytorch_model*.bin",
      "pytorch_model_fsdp_*", "global_step*")),
    ("optimizer.pt", ("optimizer.pt", "optimizer.bin", "optimizer_*", "global_step*")),
    ("scheduler.pt", ("scheduler.pt", "global_step*")),
    ("rng_state.pth", ("rng_state*.pth",)),
    (TRAINER_STATE, (TRAINER_STATE,)),
)


def checkpoint_problem(folder: str, weights_only: bool = False) -> str | None:
    """Why `folder` is not a whole checkpoint (its first missing, empty or unreadable part), or None when it is.

    Whole: weights, optimizer, scheduler, RNG state and trainer_state.json, each there and not empty, and the state
    parses. `weights_only` (--resume_only_model) asks for the weights alone."""
    names = os.listdir(folder) if os.path.isdir(folder) else []

    def holds(path: str) -> bool:
        return bool(os.listdir(path)) if os.path.isdir(path) else os.path.getsize(path) > 0

    for part, patterns in CHECKPOINT_PARTS[:1] if weights_only else CHECKPOINT_PARTS:
        if not any(holds(os.path.join(folder, n)) for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)):
            return f"{part} is missing or empty"
    if not weights_only:
        try:
            with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as fh:
                int(json.load(fh)["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"{TRAINER_STATE} does not parse"
    return None


def checkpoints_newest_first(folder: str) -> list[str]:
    """Every `checkpoint-<step>` folder under `folder` (a run folder, or an output folder holding runs), whole or
    not, the most recently saved first (staging folders are never looked at)."""
    found = []
    for root, dirs, _ in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # never a staging folder
        found += [os.path.join(root, d) for d in dirs if d.startswith("checkpoint-") and d[11:].isdigit()]

    def saved_at(path: str) -> float:
        state = os.path.join(path, TRAINER_STATE)
        return os.path.getmtime(state if os.path.isfile(state) else path)

    return sorted(found, key=lambda p: (saved_at(p), p), reverse=True)


def newest_checkpoint(folder: str) -> str | None:
    """The newest whole checkpoint under `folder` (see `checkpoint_problem`)."""
    return next((p for p in checkpoints_newest_first(folder) if checkpoint_problem(p) is None), None)


def trim_log(path: str, last_step: int) -> None:
    """Drop log lines past `last_step`: a resumed run does those steps again."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)
