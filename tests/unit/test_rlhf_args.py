"""`martlet rlhf/dpo/orpo` arguments: SFT's plus the preference ones, checked together, nothing rewritten."""

import dataclasses
import subprocess
import sys

import pytest

from martlet.args import parse_cli
from martlet.args.base import format_help
from martlet.args.rlhf import DPOArguments, ORPOArguments, RLHFArguments
from martlet.args.sft import SftArguments
from martlet.errors import MartletError


def args(**kw):
    return RLHFArguments(dataset=["pref-math#8"], **kw)


def test_shares_every_sft_argument():
    sft = {f.name for f in dataclasses.fields(SftArguments)}
    assert sft <= {f.name for f in dataclasses.fields(RLHFArguments)}
    parsed = parse_cli(RLHFArguments, ["--rlhf_type", "simpo", "--beta", "2.5", "--simpo_gamma", "0.5", "--dataset",
                                       "pref-math", "--sft_type", "full", "--lr", "1e-6", "--ref_model", "none"])
    assert (parsed.rlhf_type, parsed.beta, parsed.simpo_gamma, parsed.sft_type, parsed.learning_rate) == (
        "simpo", 2.5, 0.5, "full", 1e-6)


@pytest.mark.parametrize("kind,beta,loss,cpo_alpha", [("dpo", 0.1, "sigmoid", 0.0), ("orpo", 0.1, "orpo", 0.0),
                                                      ("simpo", 2.0, "simpo", 0.0), ("cpo", 0.1, "sigmoid", 1.0),
                                                      ("kto", 0.1, "kto", 0.0)])
def test_method_defaults_are_derived_not_written(kind, beta, loss, cpo_alpha):
    a = args(rlhf_type=kind, batch_size=2).validate()
    assert (a.effective_beta(), a.effective_loss_type(), a.effective_cpo_alpha()) == (beta, loss, cpo_alpha)
    assert a.beta is None and a.loss_type is None  # validate() changed nothing
    assert a.uses_reference() == (kind in ("dpo", "kto"))


@pytest.mark.parametrize("kw,field", [
    (dict(loss_type="hinge", rlhf_type="orpo"), "loss_type"),
    (dict(loss_type="simpo"), "loss_type"),
    (dict(rpo_alpha=1.0, rlhf_type="orpo"), "rpo_alpha"),
    (dict(cpo_alpha=0.5), "cpo_alpha"),
    (dict(simpo_gamma=0.5, rlhf_type="cpo"), "simpo_gamma"),
    (dict(desirable_weight=2.0), "desirable_weight"),
    (dict(ref_model_id_or_path="x", rlhf_type="simpo"), "ref_model_id_or_path"),
    (dict(precompute_ref_log_probs=True, rlhf_type="orpo"), "precompute_ref_log_probs"),
    (dict(beta=0.0), "beta"),
    (dict(rlhf_type="kto"), "batch_size"),  # KTO's KL term needs 2+ rows per batch
    (dict(rlhf_type="ppo"), "rlhf_type"),
    (dict(packing=True), "packing"),  # pairs are batched by their trainer
])
def test_inconsistent_arguments_name_the_field(kw, field):
    with pytest.raises(MartletError) as err:
        args(**kw).validate()
    assert err.value.field == field


def test_valid_combinations():
    args(loss_type="ipo").validate()
    args(rlhf_type="cpo", loss_type="hinge", cpo_alpha=0.0).validate()
    args(rlhf_type="simpo", cpo_alpha=0.2, simpo_gamma=0.5).validate()
    args(rlhf_type="kto", batch_size=4, desirable_weight=1.33, loss_type="apo_zero_unpaired").validate()
    args(rpo_alpha=1.0, sft_type="full", precompute_ref_log_probs=True).validate()
    assert args(padding_free=True).validate().effective_padding_free()  # on by default, or asked for
    assert args(rlhf_type="orpo").validate().effective_padding_free()
    assert not args(padding_free=False).validate().effective_padding_free()
    with pytest.raises(MartletError, match="no training data"):
        RLHFArguments().validate()


def test_dpo_and_orpo_fix_the_method():
    assert parse_cli(DPOArguments, ["--dataset", "x"]).rlhf_type == "dpo"
    assert parse_cli(ORPOArguments, ["--dataset", "x"]).rlhf_type == "orpo"
    with pytest.raises(MartletError, match="choose one of dpo"):
        parse_cli(DPOArguments, ["--rlhf_type", "orpo"])


def test_help_and_did_you_mean():
    text = format_help(RLHFArguments, "martlet rlhf")
    for option in ("--rlhf_type", "--beta", "--loss_type", "--rpo_alpha", "--simpo_gamma", "--cpo_alpha",
                   "--desirable_weight", "--undesirable_weight", "--ref_model_id_or_path", "--lora_rank", "--dataset"):
        assert option in text, option
    assert text.index("--rlhf_type") < text.index("--model_id_or_path")  # the preference group comes first
    with pytest.raises(MartletError, match="Did you mean: simpo_gamma"):
        parse_cli(RLHFArguments, ["--simpo_gama", "1"])


def test_cli_commands():
    from martlet.cli import COMMANDS

    assert {"rlhf", "dpo", "orpo"} <= set(COMMANDS)
    out = subprocess.run([sys.executable, "-m", "martlet.cli", "orpo", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--beta" in out.stdout and "Odds Ratio" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "martlet.cli", "rlhf", "--rlhf_type", "orpo", "--rpo_alpha", "1",
                          "--dataset", "pref-math"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "field 'rpo_alpha'" in bad.stderr and "Traceback" not in bad.stderr


def test_public_api():
    import martlet.llm as llm

    for name in ("RLHFArguments", "DPOArguments", "ORPOArguments", "rlhf_main", "dpo_main", "orpo_main"):
        assert callable(getattr(llm, name)), name
