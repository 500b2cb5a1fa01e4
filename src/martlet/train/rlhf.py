"""`martlet rlhf` / `rlhf_main` (DPO, ORPO, SimPO, CPO, KTO), `martlet dpo` and `martlet orpo`: read top to bottom.

parse -> validate -> model files -> tokenizer and template -> preference data -> model (+LoRA) -> reference
-> run folder -> trainer -> train -> curves -> result. Everything but the data, the reference and the trainer
is SFT's (train/run.py: resume, whole checkpoints, stop on a signal); checkpoints have SFT's layout, so
`martlet infer`, `export` and `deploy` read them as they are.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from martlet.args import parse_cli
from martlet.args.rlhf import DPOArguments, ORPOArguments, RLHFArguments
from martlet.data.preference import encode_preference_rows, preference_train_val_rows
from martlet.launch import main_process_first
from martlet.models.loader import load_model, resolve_model
from martlet.templates import get_template
from martlet.train.sft import _attn, _callbacks, _load_for_training, _training_kwargs
from martlet.utils import setup_logging

METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
           "logps/rejected")


def rlhf_main(args: RLHFArguments | Sequence[str] | None = None, *, cls: type = RLHFArguments) -> dict[str, Any]:
    """Preference-train and return {best_model_checkpoint, last_model_checkpoint, log_history, ...}."""
    setup_logging()
    if not isinstance(args, RLHFArguments):
        args = parse_cli(cls, args)
    args.validate()
    from martlet.train.run import prepare_run

    device, dtype, spec, tokenizer = prepare_run(args)
    # lengths are checked per pair (prompt + longer reply), so the template itself does not cut
    template = get_template(args.template_type, tokenizer, args.system, None, fallback=spec.template_type)
    tokenizer.chat_template = template.chat_template  # saved with every checkpoint

    train_rows, val_rows = preference_train_val_rows(args)
    encode = dict(max_length=args.max_length, truncation_strategy=args.truncation_strategy,
                  interleave_seed=args.seed if args.rlhf_type == "kto" else None, cache=args.load_from_cache_file)
    with main_process_first():  # under torchrun, rank 0 tokenizes and caches; the others read the cache
        train_set, train_stats = encode_preference_rows(train_rows, template, **encode)
        val_set, val_stats = (encode_preference_rows(val_rows, template, what="val", **encode) if val_rows
                              else (None, None))

    model = _load_for_training(args, spec, dtype, device)
    ref_model = _reference_model(args, spec, dtype, device)
    from martlet.train.outputs import run_info
    from martlet.train.rlhf_trainers import build_trainer
    from martlet.train.run import open_run_dir, resume_checkpoint, train_and_report

    checkpoint = resume_checkpoint(args)
    info = run_info(args, spec, template, command=args.rlhf_type)
    info.update(dtype=dtype, data={"train": train_stats, "val": val_stats},
                reference=_describe_reference(args, ref_model))
    run_dir = open_run_dir(args, spec.model_type, info, checkpoint)
    has_eval = val_set is not None
    trainer = build_trainer(args, model, ref_model, tokenizer, train_set, val_set,
                            _training_kwargs(args, run_dir, dtype, device, has_eval, model),
                            _callbacks(args, info, run_dir, has_eval))
    if args.precompute_ref_log_probs:
        trainer.ref_model = None  # its log-probs are in the data now
    result = train_and_report(trainer, args, run_dir, info, checkpoint)
    if trainer.is_world_process_zero():  # as the loss curves (train/run.py): one writer, which made the folder
        result["images"] += _plot_metrics(result["log_history"], os.path.join(run_dir, "images"))
    return result


def dpo_main(args: DPOArguments | Sequence[str] | None = None) -> dict[str, Any]:
    return rlhf_main(args, cls=DPOArguments)


def orpo_main(args: ORPOArguments | Sequence[str] | None = None) -> dict[str, Any]:
    return rlhf_main(args, cls=ORPOArguments)


def _reference_model(args: RLHFArguments, spec: Any, dtype: str, device: str):
    """A frozen reference model, or None: the LoRA model with its adapter off, precomputed log-probs (full
    training with --precompute_ref_log_probs), or a method that needs no reference."""
    if not args.uses_reference():
        return None
    if args.ref_model_id_or_path is None and (args.sft_type == "lora" or args.precompute_ref_log_probs):
        return None
    ref_spec = spec
    if args.ref_model_id_or_path is not None:
        ref_spec = resolve_model(args.ref_model_type, args.ref_model_id_or_path, revision=None,
                                 check_model_is_latest=args.check_model_is_latest, hub_token=args.hub_token)
    model = load_model(ref_spec, dtype="fp32" if device == "cpu" else dtype, trust_remote_code=args.trust_remote_code,
                       attn_impl=_attn(args, device))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key in METRICS:
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
