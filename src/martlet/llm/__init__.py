"""The public Python API, as the spec uses it: `from martlet.llm import SftArguments, sft_main, ...`.

Names are imported on first use, so `import martlet.llm` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # arguments and commands
    "SftArguments": "martlet.args.sft", "PtArguments": "martlet.args.sft",
    "sft_main": "martlet.train.sft", "pt_main": "martlet.train.sft",
    "RLHFArguments": "martlet.args.rlhf", "DPOArguments": "martlet.args.rlhf", "ORPOArguments": "martlet.args.rlhf",
    "rlhf_main": "martlet.train.rlhf", "dpo_main": "martlet.train.rlhf", "orpo_main": "martlet.train.rlhf",
    "GRPOArguments": "martlet.args.rlhf", "grpo_main": "martlet.train.rlhf",
    "RewardModel": "martlet.train.reward_model", "register_reward_func": "martlet.train.rewards",
    # models, templates, data
    "ModelType": "martlet.models.registry", "register_model": "martlet.models.registry",
    "get_model_info": "martlet.models.registry",
    "get_model_tokenizer": "martlet.models.api", "get_default_template_type": "martlet.models.api",
    "get_template": "martlet.templates", "register_template": "martlet.templates", "Template": "martlet.templates",
    "DatasetName": "martlet.data.names", "register_dataset": "martlet.data.sources",
    "MartletError": "martlet.errors",
    # inference
    "InferArguments": "martlet.args.infer", "infer_main": "martlet.infer.main", "merge_lora": "martlet.infer.merge",
    "inference": "martlet.infer.api", "inference_stream": "martlet.infer.api",
    "TransformersEngine": "martlet.infer.engine",
    "EvalArguments": "martlet.args.eval", "eval_main": "martlet.evaluation", "evaluate": "martlet.evaluation",
    # export
    "ExportArguments": "martlet.args.export", "export_main": "martlet.export.main",
    # serving
    "DeployArguments": "martlet.args.serve", "AppUIArguments": "martlet.args.serve",
    "deploy_main": "martlet.serve.main", "app_ui_main": "martlet.ui.app", "create_app": "martlet.serve.app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'martlet.llm' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
