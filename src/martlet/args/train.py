"""How training runs and where it writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from martlet.args.base import arg
from martlet.args.training_passthrough import TRAINING_ARGS_KEYS


@dataclass
class TrainArguments:
    output_dir: str = arg("output", "Runs go to <output_dir>/<model_type>/v<N>-<time>/.")
    add_output_dir_suffix: bool = arg(True, "Add <model_type>/v<N>-<time>/ to --output_dir.")
    overwrite_output_dir: bool = arg(False, "Train into a run folder that already holds another run's files "
                                            "(checkpoints, logging.jsonl, sft_args.json, ...): they are deleted "
                                            "first. Without it such a folder is refused, unless the run resumes "
                                            "from one of its checkpoints.")
    num_train_epochs: float = arg(1.0, "Passes over the training set.", aliases=("epochs",),
                                   bounds="[0, inf)")
    max_steps: int = arg(-1, "Stop after this many optimizer steps (-1: use the epochs).", bounds="[1, inf)",
                         unset=(-1,))
    learning_rate: Optional[float] = arg(None, "Peak learning rate. Default: 1e-4 for LoRA, 1e-5 for full.",
                                         aliases=("lr",), bounds="(0, inf)")
    batch_size: int = arg(1, "Samples per device per step.", aliases=("per_device_train_batch_size",),
                          bounds="[1, inf)")
    eval_batch_size: Optional[int] = arg(None, "Samples per device per evaluation step (default: batch_size).",
                                         aliases=("per_device_eval_batch_size",), bounds="[1, inf)")
    gradient_accumulation_steps: Optional[int] = arg(None, "Steps accumulated per update. Default: "
                                                           "ceil(16 / batch_size / processes).",
                                                   bounds="[1, inf)")
    weight_decay: float = arg(0.1, "AdamW weight decay.", bounds="[0, inf)")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0: no clipping).", bounds="[0, inf)")
    lr_scheduler_type: str = arg("cosine", "Learning rate schedule (transformers' names).")
    warmup_ratio: float = arg(0.05, "Share of steps spent warming up.", bounds="[0, 1]")
    eval_steps: int = arg(50, "Evaluate every N steps (and at the end).", bounds="[1, inf)")
    save_steps: Optional[int] = arg(None, "Save a checkpoint every N steps (default: eval_steps) and at the end.",
                                     bounds="[1, inf)")
    logging_steps: int = arg(5, "Log every N steps.", bounds="[1, inf)")
    save_total_limit: Optional[int] = arg(2, "Keep at most N checkpoints (the best is always kept; none: keep "
                                                "all).", bounds="[1, inf)")
    save_only_model: bool = arg(False, "Save weights only, without optimizer state (smaller, not resumable).")
    gradient_checkpointing: Optional[bool] = arg(None, "Recompute activations in the backward pass to save memory. "
                                                       "Default: on, except on a CPU when a step's activations "
                                                       "take under an eighth of the memory.")
    resume_from_checkpoint: Optional[str] = arg(None, "A checkpoint folder to resume from, or true for the newest "
                                                      "whole one under --output_dir (weights, optimizer, scheduler, "
                                                      "RNG state and trainer_state.json, all readable; newer ones "
                                                      "that are not whole are skipped and named). The run continues "
                                                      "in that checkpoint's folder.")
    resume_only_model: bool = arg(False, "With --resume_from_checkpoint: load only the checkpoint's weights (its "
                                         "optimizer, scheduler, RNG and trainer state may be missing) and start a "
                                         "new run from them: step 0, a fresh optimizer and learning-rate schedule, "
                                         "a new run folder.")
    seed: int = arg(42, "Seed of model initialisation and data order.", bounds="[0, 4294967295]")
    training_args: Dict[str, Any] = arg({}, "Fields of transformers' TrainingArguments that Martlet does not set "
                                            "itself, as a JSON object, e.g. '{\"optim\": \"adafactor\"}'. Each may "
                                            "also be given as its own argument (--optim adamw_torch_fused, "
                                            "--adam_beta2 0.95, --lr_scheduler_kwargs '{\"min_lr\": 1e-6}'), "
                                            "typed as transformers types it and checked by transformers before "
                                            "the run starts.", extra_keys=TRAINING_ARGS_KEYS)
    report_to: List[str] = arg(["tensorboard"], "Where metrics go besides logging.jsonl: tensorboard, wandb, none.")
    dataloader_num_workers: int = arg(0, "Data loader worker processes.", bounds="[0, inf)")
    disable_tqdm: bool = arg(False, "Hide the progress bar.")
    push_to_hub: bool = arg(False, "Upload checkpoints to the hub while training.")
    hub_model_id: Optional[str] = arg(None, "Hub repository for --push_to_hub.")
    hub_private_repo: bool = arg(False, "Create the hub repository as private.")
    # speed and memory (docs/en/performance.md)
    padding_free: Optional[bool] = arg(None, "Lay each batch end to end in one row, with no padding and no attention "
                                             "across samples (every training command). Default: on, except for remote-code "
                                             "models.")
    packing: bool = arg(False, "Pack samples into rows of up to max_length tokens before training; a step then "
                               "sees batch_size packed rows.")
    lean_loss: bool = arg(True, "Compute logits and loss only at labelled positions, a chunk at a time (same "
                                "loss, far less memory).")
    group_by_length: bool = arg(False, "Batch samples of similar length together (less padding when "
                                       "padding_free is off).")
    torch_compile: bool = arg(False, "Compile the model with torch.compile (slow to start; helps long runs).")
    use_liger_kernel: bool = arg(False, "Liger's fused Triton kernels (GPU only; needs `pip install liger-kernel`).")
    fsdp: Optional[str] = arg(None, "Fully sharded data parallel (FSDP2, through accelerate) instead of DDP: "
                                    "options among full_shard, shard_grad_op, offload, auto_wrap "
                                    "('true' means 'full_shard auto_wrap').")
    fsdp_config: Optional[str] = arg(None, "A JSON file of FSDP settings (transformers' fsdp_config keys).")
    deepspeed: Optional[str] = arg(None, "DeepSpeed config: default-zero2, default-zero3, zero2-offload, "
                                         "zero3-offload or a JSON file.")
