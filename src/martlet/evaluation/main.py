"""`martlet eval` / `eval_main` / `evaluate`: read top to bottom.

parse -> validate -> questions (and the standard suites' checks) -> plan -> engine -> each suite, in batches
-> the base model (the adapter switched off, or the base weights loaded) -> table, JSON, PNG.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Sequence

from martlet.args.base import parse_cli
from martlet.args.eval import HARNESS_SUITES, EvalArguments
from martlet.args.infer import InferArguments
from martlet.evaluation.harness import check_harness, run_harness
from martlet.evaluation.report import format_table, plot_scores, result_stem, write_json
from martlet.evaluation.suites import Question, builtin_questions
from martlet.infer.adapters import AS_LOADED
from martlet.infer.checkpoint import InferPlan, plan_inference
from martlet.infer.generation import GenConfig
from martlet.infer.load import load_engine
from martlet.infer.protocol import Engine
from martlet.models.loader import resolve_model
from martlet.utils import setup_logging

logger = logging.getLogger("martlet")


def evaluate(**kwargs: Any) -> dict[str, Any]:
    """`eval_main(EvalArguments(**kwargs))`: e.g. evaluate(ckpt_dir=..., eval_base=True, eval_dataset=[...])."""
    return eval_main(EvalArguments(**kwargs))


def eval_main(args: EvalArguments | Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate; returns {"models": {name: {suite: {accuracy, correct, total}}}, "json": path, "png": path}.

    The names are "tuned" (the --ckpt_dir) and "base" (its base model with --eval_base true, or the
    --model_id_or_path evaluated without a checkpoint)."""
    setup_logging()
    if not isinstance(args, EvalArguments):
        args = parse_cli(EvalArguments, args)
    args.validate()
    infer_args = to_infer_args(args)
    plan = plan_inference(infer_args)
    harness = [suite for suite in args.eval_dataset if suite in HARNESS_SUITES]
    check_harness(harness)  # before any model is loaded
    questions = suite_questions(args, plan)

    engine = load_engine(infer_args, plan)
    models = {}
    if args.eval_base and plan.adapter_dir:  # one model: the adapter switched off is the base model
        models["base"] = evaluate_model(engine, args, plan, questions, harness, adapter=None)
    models["tuned" if args.ckpt_dir else "base"] = evaluate_model(engine, args, plan, questions, harness)
    if args.eval_base and not plan.adapter_dir:  # a full checkpoint: its base model's weights are loaded next
        del engine
        base_args, base_plan = base_model_args(infer_args, plan)
        base = evaluate_model(load_engine(base_args, base_plan), args, base_plan, questions, harness)
        models = {"base": base, **models}
    return report(args, models)


def evaluate_model(engine: Engine, args: EvalArguments, plan: InferPlan, questions: dict[str, list[Question]],
                   harness: list[str], *, adapter: Optional[str] = AS_LOADED) -> dict[str, Any]:
    """{scores, details, source} of one model: the built-in suites through the engine, then the standard ones."""
    scores, details = run_suites(engine, args, questions, adapter=adapter)
    scores.update(harness_scores(args, plan, harness, use_adapter=adapter is not None))
    tuned = plan.checkpoint is not None and adapter is not None
    source = plan.checkpoint.path if tuned else plan.model_id_or_path or "the embedded SmolLM2-135M-Instruct"
    return {"scores": scores, "details": details, "source": source}


def to_infer_args(args: EvalArguments) -> InferArguments:
    """The InferArguments that load the engine: every field the two classes share."""
    names = {f.name for f in dataclasses.fields(InferArguments)}
    return InferArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name in names})


def suite_questions(args: EvalArguments, plan: InferPlan) -> dict[str, list[Question]]:
    """The questions of every built-in suite asked for; self-cognition's names default to the checkpoint's."""
    saved = plan.checkpoint.sft_args if plan.checkpoint else {}
    names = args.model_name or saved.get("model_name") or []
    authors = args.model_author or saved.get("model_author") or []
    return {suite: builtin_questions(suite, args.eval_limit, model_name=names, model_author=authors,
                                     answer_instruction=args.answer_instruction)
            for suite in args.eval_dataset if suite not in HARNESS_SUITES}


def run_suites(engine: Engine, args: EvalArguments, questions: dict[str, list[Question]], *,
               adapter: Optional[str]) -> tuple[dict[str, dict], dict[str, list]]:
    """({suite: {accuracy, correct, total}}, {suite: [per-question records]}): one greedy `generate` per batch."""
    config = GenConfig(max_new_tokens=args.max_new_tokens, do_sample=False)
    scores, details = {}, {}
    for suite, items in questions.items():
        records = []
        for start in range(0, len(items), args.max_batch_size):
            batch = items[start: start + args.max_batch_size]
            outputs = engine.generate([list(q.messages) for q in batch], config, adapter=adapter)
            records += [{"query": q.messages[-1]["content"], "expected": q.expected, "reply": out.text,
                         "correct": q.is_correct(out.text)} for q, out in zip(batch, outputs)]
        correct = sum(record["correct"] for record in records)
        scores[suite] = {"accuracy": correct / len(records) if records else 0.0, "correct": correct,
                         "total": len(records)}
        details[suite] = records
        logger.info("%s: %d/%d correct", suite, correct, len(records))
    return scores, details


def base_model_args(infer_args: InferArguments, plan: InferPlan) -> tuple[InferArguments, InferPlan]:
    """The arguments and plan that load the base model of a full (or merged) checkpoint."""
    ckpt = plan.checkpoint
    run_dir = ckpt.run.get("model_dir") if ckpt else None
    base = run_dir if run_dir and os.path.isdir(run_dir) else (ckpt.sft_args.get("model_id_or_path") if ckpt else None)
    base_args = dataclasses.replace(infer_args, ckpt_dir=None, model_id_or_path=base, model_type=plan.model_type,
                                    template_type=plan.template_type, system=plan.system)
    return base_args, plan_inference(base_args)


def harness_scores(args: EvalArguments, plan: InferPlan, suites: list[str], *, use_adapter: bool = True) -> dict:
    """The standard suites' scores for the plan's model (with its adapter, unless `use_adapter` is False)."""
    if not suites:
        return {}
    spec = resolve_model(plan.model_type, plan.model_id_or_path, check_model_is_latest=args.check_model_is_latest,
                         revision=args.model_revision, hub_token=args.hub_token)
    return run_harness(suites, spec.model_dir, adapter_dir=plan.adapter_dir if use_adapter else None,
                       tokenizer_dir=plan.tokenizer_dir, limit=args.eval_limit, batch_size=args.max_batch_size)


def report(args: EvalArguments, models: dict[str, dict]) -> dict[str, Any]:
    """Print the table; write <output_dir>/eval-<time>.json (scores, sources, arguments, every reply) and .png."""
    output_dir = args.output_dir or os.path.join(args.ckpt_dir or "output", "eval_result")
    stem = result_stem(output_dir)
    scores = {name: model["scores"] for name, model in models.items()}
    payload = {"models": scores, "sources": {name: model["source"] for name, model in models.items()},
               "arguments": dataclasses.asdict(args),
               "details": {name: model["details"] for name, model in models.items()}}
    json_path = write_json(stem + ".json", payload)
    png_path = plot_scores(stem + ".png", scores)
    for name, model in models.items():
        print(f"{name}: {model['source']}")
    print(format_table(scores))
    print(f"results: {json_path}\nchart: {png_path}")
    return {"models": scores, "json": json_path, "png": png_path}


def main(argv: Sequence[str] | None = None) -> int:
    eval_main(argv)
    return 0
