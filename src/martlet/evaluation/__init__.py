"""`martlet eval` as a Python API: evaluate a model or checkpoint, its base model beside it if asked.

    from martlet.evaluation import evaluate
    result = evaluate(ckpt_dir="output/.../checkpoint-80", eval_base=True,
                      eval_dataset=["math-easy-en", "self-cognition"], eval_limit=50)
    result["models"]["tuned"]["math-easy-en"]   # {"accuracy": 0.42, "correct": 21, "total": 50}
    result["models"]["base"]["math-easy-en"]
    result["json"], result["png"]               # <output_dir>/eval-<time>.json and .png

`evaluate(**fields)` takes the fields of `martlet.args.eval.EvalArguments` (as `martlet eval --help` lists
them); `eval_main(EvalArguments(...))` or `eval_main(["--ckpt_dir", ...])` is the same. The models are named
"tuned" (the --ckpt_dir) and "base" (its base model with eval_base=True, or the model evaluated without a
checkpoint). Built-in suites (offline, graded by Martlet): math-easy-en, math-easy-zh, math-en, math-zh,
self-cognition; standard ones through lm-evaluation-harness: gsm8k, mmlu, ceval, cmmlu. Replies are greedy,
generated in batches of --max_batch_size by the inference engine (`martlet.infer.load.load_engine`).
"""

from martlet.evaluation.main import eval_main, evaluate

__all__ = ["eval_main", "evaluate"]
