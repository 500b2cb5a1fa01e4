"""`martlet rlhf` / `rlhf_main` (DPO, ORPO, SimPO, CPO, KTO; GRPO and reward models: train/grpo.py,
train/reward_model.py), `martlet dpo`, `martlet orpo` and `martlet grpo`: read top to bottom.

parse -> validate -> model files -> tokenizer and template -> preference data -> model (+LoRA) -> reference
-> run folder -> trainer -> train -> curves -> result. Everything but the data, the reference and the trainer
is the shared pipeline's (train/pipeline.py: resume, whole checkpoints, stop on a signal); checkpoints have
SFT's layout, so `martlet infer`, `export` and `deploy` read them as they are.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from martlet.args import parse_cli
from martlet.args.rlhf import DPOArguments, GRPOArguments, ORPOArguments, RLHFArguments
from martlet.data.preference import encode_preference_rows, preference_train_val_rows
from martlet.launch import is_main_process
from martlet.models.loader import load_model, resolve_model
from martlet.train.grpo import GrpoMethod
from martlet.train.model_setup import attention_implementation
from martlet.train.pipeline import EncodedData, Reference, RunSetup, TrainingRun, encode_split, run_training
from martlet.train.reward_model import RewardModelMethod
from martlet.train.rlhf_trainers import build_trainer
from martlet.utils import setup_logging

METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
           "logps/rejected", "reward", "reward_std", "frac_reward_zero_std", "kl", "completions/mean_length",
           "accuracy")  # (grpo: trl's names, and each reward's mean: rewards/<name>/mean, added per run)


def rlhf_main(args: RLHFArguments | Sequence[str] | None = None, *, cls: type = RLHFArguments) -> dict[str, Any]:
    """Preference-train and return {best_model_checkpoint, last_model_checkpoint, log_history, ...}."""
    setup_logging()
    if not isinstance(args, RLHFArguments):
        args = parse_cli(cls, args)
    args.validate()
    method = {"grpo": GrpoMethod, "rm": RewardModelMethod}.get(args.rlhf_type, PreferenceMethod)()
    result = run_training(args, method)
    if is_main_process():  # as the loss curves (train/pipeline.py): one writer, which made the folder
        result["images"] += _plot_metrics(result["log_history"], os.path.join(result["output_dir"], "images"))
    return result


class PreferenceMethod:
    """The preference methods' part of the pipeline: pairs (KTO: single replies with a label) encoded by
    `martlet.data.preference`, a frozen reference where the method needs one, trl's or Martlet's trainer."""

    cut_in_template = False  # lengths are checked per pair (prompt + longer reply), not by the template

    def command(self, args: RLHFArguments) -> str:
        return args.rlhf_type

    def encode(self, setup: RunSetup) -> EncodedData:
        args = setup.args
        train_rows, val_rows = preference_train_val_rows(args)
        return encode_split(encode_preference_rows, train_rows, val_rows, setup.template,
                            max_length=args.max_length, truncation_strategy=args.truncation_strategy,
                            interleave_seed=args.seed if args.rlhf_type == "kto" else None,
                            cache=args.load_from_cache_file)

    def reference(self, setup: RunSetup) -> Reference:
        model = _reference_model(setup)
        return Reference(model, _describe_reference(setup.args, model))

    def build_trainer(self, run: TrainingRun, model: Any, reference: Reference, data: EncodedData) -> Any:
        has_eval = data.val is not None
        trainer = build_trainer(run.args, model, reference.model, run.tokenizer, data.train, data.val,
                                run.training_kwargs(model, has_eval), run.callbacks(has_eval), run.run_files)
        if run.args.precompute_ref_log_probs:
            trainer.ref_model = None  # its log-probs are in the data now
        return trainer


def dpo_main(args: DPOArguments | Sequence[str] | None = None) -> dict[str, Any]:
    return rlhf_main(args, cls=DPOArguments)


def orpo_main(args: ORPOArguments | Sequence[str] | None = None) -> dict[str, Any]:
    return rlhf_main(args, cls=ORPOArguments)


def grpo_main(args: GRPOArguments | Sequence[str] | None = None) -> dict[str, Any]:
    return rlhf_main(args, cls=GRPOArguments)


def _reference_model(setup: RunSetup) -> Any:
    """A frozen reference model, or None: the LoRA model with its adapter off, precomputed log-probs (full
    training with --precompute_ref_log_probs), or a method that needs no reference."""
    args, device = setup.args, setup.device
    if not args.uses_reference():
        return None
    if args.ref_model_id_or_path is None and (args.sft_type == "lora" or args.precompute_ref_log_probs):
        return None
    ref_spec = setup.spec
    if args.ref_model_id_or_path is not None:
        ref_spec = resolve_model(args.ref_model_type, args.ref_model_id_or_path, revision=None,
                                 check_model_is_latest=args.check_model_is_latest, hub_token=args.hub_token)
    model = load_model(ref_spec, dtype="fp32" if device == "cpu" else setup.dtype,
                       trust_remote_code=args.trust_remote_code, attn_impl=attention_implementation(args, device))
    model.config.use_cache = False
    return model.eval().requires_grad_(False)


def _describe_reference(args: RLHFArguments, ref_model: Any) -> str:
    if not args.uses_reference():
        return "none (reference-free method)"
    if ref_model is not None:
        return f"frozen model: {args.ref_model_id_or_path or 'a copy of the model being trained'}"
    if args.sft_type == "lora":
        return "the model with its LoRA adapter switched off" + (", precomputed" if args.precompute_ref_log_probs
                                                                 else "")
    return "log-probs of the initial model, precomputed before training"


def _plot_metrics(log_history: list[dict[str, Any]], images_dir: str) -> list[str]:
    """One PNG per preference metric (train and eval curves), next to SFT's loss curves."""
    import matplotlib  # here: it costs startup time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    keys = dict.fromkeys(METRICS + tuple(k for h in log_history for k in h if k.startswith("rewards/")
                                         and k.endswith("/mean")))
    for key in keys:
        curves = {name: [(h["step"], h[k]) for h in log_history if k in h and "step" in h]
                  for name, k in (("train", key), ("eval", f"eval_{key}"))}
        if not any(curves.values()):
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, points in curves.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(images_dir, key.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    return 130 if rlhf_main(argv)["interrupted"] else 0


def dpo_cli(argv: Sequence[str] | None = None) -> int:
    return 130 if dpo_main(argv)["interrupted"] else 0


def orpo_cli(argv: Sequence[str] | None = None) -> int:
    return 130 if orpo_main(argv)["interrupted"] else 0


def grpo_cli(argv: Sequence[str] | None = None) -> int:
    return 130 if grpo_main(argv)["interrupted"] else 0
