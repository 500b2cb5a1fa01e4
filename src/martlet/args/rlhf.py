"""The arguments of `martlet rlhf`, `martlet dpo` and `martlet orpo`: the SFT arguments plus the preference ones.

A value left at None means "the method's usual default" (see the `effective_*` helpers); nothing here rewrites
a field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from martlet.args.base import arg
from martlet.args.sft import SftArguments
from martlet.errors import MartletError

RLHF_TYPES = ("dpo", "orpo", "simpo", "cpo", "kto")
REFERENCE_FREE = ("orpo", "simpo", "cpo")  # these train against the policy alone
# loss types each method accepts (the first is its default); DPO's and KTO's are trl's names
LOSS_TYPES = {
    "dpo": ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
            "sigmoid_norm"),
    "cpo": ("sigmoid", "hinge", "ipo"),
    "kto": ("kto", "apo_zero_unpaired"),
    "orpo": ("orpo",),
    "simpo": ("simpo",),
}
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "cpo": 0.1, "kto": 0.1}


@dataclass
class PreferenceArguments:
    rlhf_type: str = arg("dpo", "Preference method: dpo, orpo, simpo, cpo or kto.", choices=RLHF_TYPES)
    beta: Optional[float] = arg(None, "Strength of the preference term. Default: 0.1 (dpo, orpo's lambda, cpo, "
                                      "kto), 2.0 (simpo).", bounds="(0, inf)")
    loss_type: Optional[str] = arg(None, "dpo: sigmoid (default), ipo, hinge, robust, bco_pair, sppo_hard, "
                                         "nca_pair, apo_zero, apo_down, sigmoid_norm. cpo: sigmoid, hinge, ipo. "
                                         "kto: kto, apo_zero_unpaired.")
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
class RLHFArguments(PreferenceArguments, SftArguments):
    """Preference training (DPO, ORPO, SimPO, CPO, KTO) with LoRA or full weights, on preference pairs."""

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
                ("precompute_ref_log_probs", self.precompute_ref_log_probs, ("dpo", "kto"))]
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
        return self

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
