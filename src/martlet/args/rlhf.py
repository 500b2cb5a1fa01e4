"""The arguments of `martlet rlhf`, `martlet dpo`, `martlet orpo` and `martlet grpo`: the SFT arguments plus the
preference, GRPO and reward-model ones.

A value left at None means "the method's usual default" (see the `effective_*` helpers); nothing here rewrites
a field.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import List, Optional

from martlet.args.base import arg
from martlet.args.sft import SftArguments
from martlet.errors import MartletError

RLHF_TYPES = ("dpo", "orpo", "simpo", "cpo", "kto", "grpo", "rm")
REFERENCE_FREE = ("orpo", "simpo", "cpo", "rm")  # these train against the policy alone (grpo: when beta is 0)
# loss types each method accepts (the first is its default); DPO's and KTO's are trl's names
LOSS_TYPES = {
    "dpo": ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
            "sigmoid_norm"),
    "cpo": ("sigmoid", "hinge", "ipo"),
    "kto": ("kto", "apo_zero_unpaired"),
    "orpo": ("orpo",),
    "simpo": ("simpo",),
    "grpo": ("grpo", "dr_grpo", "dapo", "bnpo"),  # trl 1.16's names; grpo: the paper's per-sequence mean
    "rm": ("bradley_terry",),
}
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "cpo": 0.1, "kto": 0.1, "grpo": 0.04, "rm": 0.0}


@dataclass
class PreferenceArguments:
    rlhf_type: str = arg("dpo", "Method: dpo, orpo, simpo, cpo, kto (preference pairs), grpo (reinforcement "
                                "learning with reward functions) or rm (a reward model on preference pairs).",
                         choices=RLHF_TYPES)
    beta: Optional[float] = arg(None, "Strength of the preference term. Default: 0.1 (dpo, orpo's lambda, cpo, "
                                      "kto), 2.0 (simpo). grpo: weight of the KL term to the reference model "
                                      "(default 0.04; 0 turns it off and loads no reference).", bounds="[0, inf)")
    loss_type: Optional[str] = arg(None, "dpo: sigmoid (default), ipo, hinge, robust, bco_pair, sppo_hard, "
                                         "nca_pair, apo_zero, apo_down, sigmoid_norm. cpo: sigmoid, hinge, ipo. "
                                         "kto: kto, apo_zero_unpaired. grpo: grpo (default), dr_grpo, dapo, bnpo.")
    rpo_alpha: Optional[float] = arg(None, "dpo: add this weight times the SFT loss on the chosen replies (RPO).",
                                        bounds="[0, inf)")
    simpo_gamma: float = arg(1.0, "simpo: target reward margin gamma.", bounds="[0, inf)")
    cpo_alpha: Optional[float] = arg(None, "cpo/simpo: weight of the SFT loss on the chosen replies. Default: 1.0 "
                                           "(cpo), 0.0 (simpo).", bounds="[0, inf)")
    desirable_weight: float = arg(1.0, "kto: weight of the desirable (label true) replies' loss.",
                                  bounds="(0, inf)")
    undesirable_weight: float = arg(1.0, "kto: weight of the undesirable (label false) replies' loss.",
                                    bounds="(0, inf)")
    ref_model_id_or_path: Optional[str] = arg(None, "dpo/kto reference model. Default: the model itself "
                                                    "(with LoRA: the adapter switched off; full: a frozen copy).",
                                              aliases=("ref_model",))
    ref_model_type: Optional[str] = arg(None, "Registered model type of --ref_model_id_or_path.")
    precompute_ref_log_probs: bool = arg(False, "dpo/kto: compute the reference log-probs once before training, "
                                                "so full training keeps no reference copy in memory.")


@dataclass
class GrpoArguments:
    reward_funcs: List[str] = arg([], "grpo: reward functions by name: accuracy (the final number equals the "
                                      "row's solution), format (the reply ends with the answer line the prompt "
                                      "asks for), or a name registered with martlet.train.rewards."
                                      "register_reward_func (e.g. in a --custom_register_path file).")
    reward_weights: List[float] = arg([], "grpo: one weight per reward (--reward_funcs, then --reward_model); "
                                          "a negative weight makes a penalty. Default: 1 each.",
                                      bounds="(-inf, inf)")
    reward_model: List[str] = arg([], "grpo: reward models trained with --rlhf_type rm (checkpoint folders), "
                                      "each scoring every completion.")
    num_generations: int = arg(4, "grpo: completions sampled per prompt (a group). --batch_size counts "
                                  "completions and must be a multiple of it.", bounds="[2, inf)")
    max_completion_length: int = arg(256, "grpo: most tokens generated per completion.", bounds="[1, inf)")
    temperature: float = arg(1.0, "grpo: sampling temperature of the completions.", bounds="(0, inf)")
    epsilon: float = arg(0.2, "grpo: clip range of the policy ratio (PPO's epsilon).", bounds="(0, 1)")
    log_completions_steps: int = arg(10, "grpo: every this many steps, append sample prompts, completions and "
                                         "rewards to completions.jsonl in the run folder (0: never).",
                                     bounds="[0, inf)")
    use_vllm: bool = arg(False, "grpo: generate with vLLM in colocate mode (same GPU as training; GPU only).")
    vllm_gpu_memory_utilization: float = arg(0.3, "grpo with --use_vllm: share of the GPU memory vLLM takes.",
                                             bounds="(0, 1]")


@dataclass
class RLHFArguments(GrpoArguments, PreferenceArguments, SftArguments):
    """Preference training (DPO, ORPO, SimPO, CPO, KTO), GRPO with reward functions, or reward-model training,
    with LoRA or full weights."""

    def validate(self) -> "RLHFArguments":
        super().validate()
        kind = self.rlhf_type
        if kind not in RLHF_TYPES:
            raise MartletError(f"unknown method {kind!r}: choose one of {', '.join(RLHF_TYPES)}.", field="rlhf_type")
        if self.loss_type is not None and self.loss_type not in LOSS_TYPES[kind]:
            raise MartletError(f"{kind} has no loss type {self.loss_type!r}: choose one of "
                               f"{', '.join(LOSS_TYPES[kind])}.", field="loss_type")
        only = [("rpo_alpha", self.rpo_alpha is not None, ("dpo",)),
                ("cpo_alpha", self.cpo_alpha is not None, ("cpo", "simpo")),
                ("simpo_gamma", self.simpo_gamma != 1.0, ("simpo",)),
                ("desirable_weight", self.desirable_weight != 1.0, ("kto",)),
                ("undesirable_weight", self.undesirable_weight != 1.0, ("kto",)),
                ("ref_model_id_or_path", self.ref_model_id_or_path is not None, ("dpo", "kto")),
                ("precompute_ref_log_probs", self.precompute_ref_log_probs, ("dpo", "kto")),
                ("beta", self.beta == 0, ("grpo",))]
        only += [(f.name, bool(getattr(self, f.name)) if f.default is MISSING else getattr(self, f.name) != f.default,
                  ("grpo",)) for f in fields(GrpoArguments)]
        for field, given, methods in only:
            if given and kind not in methods:
                raise MartletError(f"applies to {' and '.join(methods)} only, not to {kind}.", field=field,
                                   hint="orpo, simpo and cpo use no reference model." if "ref" in field else None)
        if self.packing:
            raise MartletError("applies to sft and pt only: preference pairs are batched by their trainer.",
                               field="packing")
        if kind == "kto" and self.batch_size < 2:
            raise MartletError("kto estimates its KL term from mismatched replies within a batch, so it needs at "
                               f"least 2 samples per batch (got {self.batch_size}).", field="batch_size",
                               hint="Pass --batch_size 2 or more.")
        if kind == "grpo":
            self._check_grpo()
        return self

    def _check_grpo(self) -> None:
        rewards = len(self.reward_funcs) + len(self.reward_model)
        if not rewards:
            raise MartletError("grpo needs at least one reward.", field="reward_funcs",
                               hint="Pass --reward_funcs accuracy format (the built-in math sets carry a solution "
                                    "column), a registered reward function, or --reward_model PATH.")
        if self.reward_weights and len(self.reward_weights) != rewards:
            raise MartletError(f"{len(self.reward_weights)} weights for {rewards} rewards (--reward_funcs, then "
                               "--reward_model): give one weight per reward.", field="reward_weights")
        accumulated = self.batch_size * self.effective_grad_accum()
        if accumulated % self.num_generations:
            raise MartletError(f"--batch_size x --gradient_accumulation_steps ({accumulated}) counts completions "
                               f"and must be a multiple of --num_generations ({self.num_generations}).",
                               field="batch_size", hint=f"Pass --batch_size {self.num_generations}, for example.")
        if self.max_completion_length >= self.max_length:
            raise MartletError(f"{self.max_completion_length} leaves no room for the prompt within --max_length "
                               f"{self.max_length}.", field="max_completion_length")

    # values derived from the arguments (never written back into them)
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.rlhf_type]

    def effective_loss_type(self) -> str:
        return self.loss_type or LOSS_TYPES[self.rlhf_type][0]

    def effective_cpo_alpha(self) -> float:
        if self.cpo_alpha is not None:
            return self.cpo_alpha
        return 1.0 if self.rlhf_type == "cpo" else 0.0

    def uses_reference(self) -> bool:
        return self.rlhf_type not in REFERENCE_FREE


@dataclass
class DPOArguments(RLHFArguments):
    """Direct Preference Optimization (`martlet dpo`): `martlet rlhf --rlhf_type dpo`."""

    rlhf_type: str = arg("dpo", "Preference method (fixed for `martlet dpo`).", choices=("dpo",))


@dataclass
class ORPOArguments(RLHFArguments):
    """Odds Ratio Preference Optimization (`martlet orpo`): `martlet rlhf --rlhf_type orpo`."""

    rlhf_type: str = arg("orpo", "Preference method (fixed for `martlet orpo`).", choices=("orpo",))


@dataclass
class GRPOArguments(RLHFArguments):
    """Group Relative Policy Optimization (`martlet grpo`): `martlet rlhf --rlhf_type grpo`."""

    rlhf_type: str = arg("grpo", "Method (fixed for `martlet grpo`).", choices=("grpo",))
