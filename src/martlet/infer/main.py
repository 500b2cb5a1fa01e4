"""`martlet infer` / `infer_main` and `martlet merge-lora`: read top to bottom.

parse -> validate -> (merge) -> plan (checkpoint + arguments) -> rows -> engine -> chat or evaluate.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from martlet.args.base import parse_cli
from martlet.args.infer import InferArguments
from martlet.custom import apply_custom_registrations
from martlet.errors import MartletError
from martlet.infer.chat import chat_loop
from martlet.infer.checkpoint import plan_inference
from martlet.infer.evaluate import eval_rows, evaluate, metrics_path, result_path
from martlet.infer.generation import GenConfig
from martlet.infer.load import load_engine
from martlet.infer.merge import merge_lora
from martlet.utils import setup_logging

logger = logging.getLogger("martlet")


def infer_main(args: InferArguments | Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate on a dataset ({result, metrics, result_path, metrics_path}) or chat ({history})."""
    setup_logging()
    if not isinstance(args, InferArguments):
        args = parse_cli(InferArguments, args)
    args.validate()
    apply_custom_registrations(args)  # before any model, template or dataset name is resolved
    from transformers import set_seed

    set_seed(args.seed)
    if args.merge_lora:
        args = dataclasses.replace(args, ckpt_dir=merge_lora(args), merge_lora=False)
    plan = plan_inference(args)
    rows = None
    if args.wants_dataset():  # read the rows before loading the model: a bad dataset fails fast
        rows = eval_rows(args, plan.checkpoint)
        logger.info("evaluating %d rows", len(rows))

    engine = load_engine(args, plan)
    config = GenConfig.from_args(args)
    if rows is None:
        return {"history": chat_loop(engine, config, stream=args.stream)}

    path = result_path(args) if args.save_result else None
    results, metrics = evaluate(engine, rows, config, batch_size=args.max_batch_size, path=path,
                                verbose=args.verbose)
    logger.info("metrics: %s", ", ".join(f"{k}={v}" for k, v in metrics.items()))
    if path:
        logger.info("results: %s", path)
        logger.info("metrics file: %s", metrics_path(path))
    return {"result": results, "metrics": metrics, "result_path": path,
            "metrics_path": metrics_path(path) if path else None}


def main(argv: Sequence[str] | None = None) -> int:
    infer_main(argv)
    return 0


def merge_cli(argv: Sequence[str] | None = None) -> int:
    """`martlet merge-lora --ckpt_dir DIR`: write DIR-merged and print its path."""
    setup_logging()
    args = parse_cli(InferArguments, argv)
    if not args.ckpt_dir:
        raise MartletError("needs the LoRA checkpoint to merge.", field="ckpt_dir")
    args.validate()
    print(merge_lora(args))
    return 0
