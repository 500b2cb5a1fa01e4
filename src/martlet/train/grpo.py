"""`martlet rlhf --rlhf_type grpo` / `martlet grpo`: GRPO's part of the training pipeline (train/pipeline.py), on
trl's stable GRPOTrainer.

rows (prompt + extra columns, grpo_data.py) -> reward functions resolved and checked against the columns and on a
check batch, before any model loads -> trl's GRPOTrainer with Martlet's model (LoRA, fused CPU kernels, bf16
weights), whole checkpoints and run files -> logging.jsonl (trl's metric names: rewards/<name>/mean and /std,
frac_reward_zero_std, completions/*, kl, clip_ratio/*) and completions.jsonl every --log_completions_steps.

Generation runs under the training precision's autocast (bf16 on a CPU), with the KV cache, batched over the whole
generation batch; scoring runs padding-free when --padding_free is on (the DPO path of rlhf_trainers.py).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import trl
from datasets import Dataset

from martlet.args.rlhf import RLHFArguments
from martlet.errors import MartletError
from martlet.infer.sampling import install as install_fast_sampling
from martlet.train import rewards
from martlet.train.grpo_data import grpo_train_val_rows
from martlet.train.pipeline import EncodedData, Reference, RunSetup, TrainingRun
from martlet.train.reward_model import RewardModel
from martlet.train.rlhf_trainers import padding_free_fused_forward
from martlet.train.trainer import AtomicCheckpointMixin, trim_log

logger = logging.getLogger("martlet")
COMPLETIONS_FILE = "completions.jsonl"


class GRPOTrainer(AtomicCheckpointMixin, trl.GRPOTrainer):
    """trl's GRPOTrainer with whole checkpoints, generation under the training autocast, and sample completions
    appended to `completions_path` every `log_completions_steps` steps."""

    def __init__(self, *args: Any, completions_path: str | None = None, log_completions_steps: int = 0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.completions_path = completions_path
        self.log_completions_steps = log_completions_steps
        self._completions_written_at = -1  # (the end-of-training summary logs at the last step again)

    def _generate_single_turn(self, *args: Any, **kwargs: Any):
        # bf16 base weights with fp32 adapters (Martlet's CPU LoRA) generate under the training autocast, as they train
        with self.accelerator.autocast():
            return super()._generate_single_turn(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        step, every = self.state.global_step, self.log_completions_steps
        if (every and step % every == 0 and step != self._completions_written_at and self.completions_path
                and self.accelerator.is_main_process and self.model.training and self._logs["prompt"]):
            write_completions(self.completions_path, step, self._logs)
            self._completions_written_at = step
        super().log(logs, start_time)


def write_completions(path: str, step: int, logged: dict[str, Any]) -> None:
    """Append the last generation batch (prompt, completion, each reward, advantage) as JSON lines."""
    names = list(logged["rewards"])
    with open(path, "a", encoding="utf-8") as fh:
        for i, (prompt, completion) in enumerate(zip(logged["prompt"], logged["completion"])):
            record = {"step": step, "prompt": prompt, "completion": rewards.completion_text(completion),
                      "rewards": {name: logged["rewards"][name][i] for name in names},
                      "advantage": logged["advantages"][i]}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


class GrpoMethod:
    """GRPO's part of the pipeline: prompts with their columns, rewards checked before training, trl's trainer."""

    cut_in_template = False  # prompts are rendered by trl with the template's jinja; completions are generated

    def command(self, args: RLHFArguments) -> str:
        return "grpo"

    def encode(self, setup: RunSetup) -> EncodedData:
        args = setup.args
        train, val = grpo_train_val_rows(args.dataset, args.val_dataset, seed=args.dataset_seed,
                                         test_ratio=args.dataset_test_ratio, reward_names=args.reward_funcs)
        if args.train_dataset_sample >= 0:
            train = train[: args.train_dataset_sample]
        where = ", ".join(args.dataset)
        rewards.check_columns(args.reward_funcs, sorted({k for row in train for k in row if k != "prompt"}), where)
        check_rows = train[:2]
        rewards.check_outputs(args.reward_funcs, check_rows, [_check_completion(row) for row in check_rows])
        stats = {"train": {"kept": len(train)}, "val": {"kept": len(val)} if val else None}
        return EncodedData(Dataset.from_list(train), None, stats)  # held-out rows: for `martlet eval`

    def reference(self, setup: RunSetup) -> Reference:
        args = setup.args
        if args.effective_beta() == 0:
            return Reference(None, "none (beta 0: no KL term)")
        if args.sft_type == "lora":
            return Reference(None, "the model with its LoRA adapter switched off")
        return Reference(None, "frozen model: a copy of the model being trained (loaded by trl)")

    def build_trainer(self, run: TrainingRun, model: Any, reference: Reference, data: EncodedData) -> GRPOTrainer:
        args = run.args
        if args.use_vllm and run.device != "cuda":
            raise MartletError("vLLM generation needs a GPU, and none is visible here.", field="use_vllm",
                               hint="Drop --use_vllm on a CPU (generation then batches with the KV cache).")
        funcs = [rewards.reward_func(name) for name in args.reward_funcs]
        models = [RewardModel(path).model_and_tokenizer() for path in args.reward_model]
        config = trl.GRPOConfig(**run.training_kwargs(model, False), **grpo_config_kwargs(args))
        completions = os.path.join(run.run_dir, COMPLETIONS_FILE)
        if run.checkpoint and not args.resume_only_model:  # its steps after the checkpoint are done again
            trim_log(completions, int(os.path.basename(run.checkpoint).split("-")[1]))
        trainer = GRPOTrainer(model=model, reward_funcs=funcs + [m for m, _ in models], args=config,
                              train_dataset=data.train, processing_class=run.tokenizer,
                              reward_processing_classes=[None] * len(funcs) + [t for _, t in models] if models
                              else None,
                              callbacks=run.callbacks(False), run_files=run.run_files,
                              completions_path=completions, log_completions_steps=args.log_completions_steps)
        install_fast_sampling()  # generation's sampling on a CPU (infer/sampling.py)
        if args.effective_padding_free() and not (args.deepspeed or args.fsdp):
            base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
            padding_free_fused_forward(base, config.temperature)  # scoring: one padding-free row, completions only
        return trainer


def grpo_config_kwargs(args: RLHFArguments) -> dict[str, Any]:
    """trl GRPOConfig's GRPO keywords from Martlet's arguments."""
    kwargs = dict(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                  temperature=args.temperature, beta=args.effective_beta(), epsilon=args.epsilon,
                  loss_type=args.effective_loss_type(), reward_weights=args.reward_weights or None,
                  log_completions=False, use_vllm=args.use_vllm)
    if args.use_vllm:
        kwargs.update(vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization)
    return kwargs


def _check_completion(row: dict[str, Any]) -> list[dict[str, str]]:
    """A completion for the check batch: the answer line the prompt asks for, holding the row's solution."""
    text = "".join(m["content"] for m in row["prompt"] if m["role"] == "user")
    line = "答案：" if rewards.prompt_language(text) == "zh" else "Answer: "
    return [{"role": "assistant", "content": f"{line}{row.get('solution', 0)}"}]

