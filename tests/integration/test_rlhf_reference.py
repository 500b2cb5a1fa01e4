"""On a tiny model and one fixed batch: the reference of a LoRA run is the base model (adapter off), and each
trainer's loss equals the paper's formula computed here from log-probs of an independent plain forward pass."""

import math

import pytest
import torch
import torch.nn.functional as F

from martlet.args.rlhf import RLHFArguments
from martlet.data.preference import encode_preference_rows, to_pair
from martlet.models.loader import load_tokenizer, resolve_model
from martlet.templates import get_template
from martlet.train.rlhf_trainers import build_trainer
from martlet.train.model_setup import load_for_training
from martlet.train.training_args import training_kwargs

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
          "rejected": f"I think it is {a + b + 1}, more or less."} for a, b in ((2, 3), (10, 7), (4, 4), (1, 9))]


def make_trainer(model_dir, tmp_path, **kw):
    args = RLHFArguments(model_id_or_path=model_dir, dataset=["unused"], lora_target_modules=["ALL"], batch_size=4,
                         report_to=["none"], **kw).validate()
    spec = resolve_model(None, model_dir)
    tokenizer = load_tokenizer(spec.model_dir)
    template = get_template("AUTO", tokenizer)
    pairs = [dict(to_pair(p), where=str(i)) for i, p in enumerate(PAIRS)]
    if args.rlhf_type == "kto":  # two desirable and two undesirable, interleaved
        pairs = [dict(prompt=p["prompt"], completion=p[key], label=key == "chosen", where=p["where"])
                 for p, key in zip(pairs, ("chosen", "rejected", "rejected", "chosen"))]
    data, _ = encode_preference_rows(pairs, template, max_length=None)
    torch.manual_seed(0)
    model = load_for_training(args, spec, "fp32", "cpu")
    kwargs = training_kwargs(args, str(tmp_path), "fp32", "cpu", False, model)
    trainer = build_trainer(args, model, None, tokenizer, data, None, kwargs, [])
    with torch.no_grad():  # a trained-looking adapter: LoRA B starts at zero, which would hide a wrong reference
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    trainer.model.eval()
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    return args, trainer, batch


@pytest.fixture(scope="module")
def base_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()  # a fresh copy: no adapter, no trl patch


def logps(model, input_ids, attention_mask, completion_mask):
    """Summed log-probs of the completion tokens from a plain forward pass (full logits)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    token = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = completion_mask[:, 1:].bool()
    return (token * mask).sum(-1).double(), mask.sum(-1).double()


def pair_logps(trainer, base_model, batch):
    policy, n = logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref, _ = logps(base_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return policy.chunk(2), ref.chunk(2), n.chunk(2)


def test_lora_reference_is_the_base_model_with_the_adapter_off(tiny_llama, base_model, tmp_path):
    _, trainer, batch = make_trainer(tiny_llama, tmp_path)
    assert list(trainer.model.peft_config) == ["default"]  # no 'ref' adapter copy, no second model
    assert trainer.ref_model is None
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    (policy_c, _), (base_c, base_r), _ = pair_logps(trainer, base_model, batch)
    assert torch.allclose(ref_chosen.double(), base_c, atol=1e-4) and torch.allclose(ref_rejected.double(), base_r,
                                                                                      atol=1e-4)
    assert not torch.allclose(policy_c, base_c, atol=1e-2)  # the adapter is on for the policy
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("loss_type,rpo_alpha", [("sigmoid", None), ("ipo", None), ("hinge", None), ("sigmoid", 0.5)])
def test_dpo_loss_equals_the_formula(tiny_llama, base_model, tmp_path, loss_type, rpo_alpha):
    args, trainer, batch = make_trainer(tiny_llama, tmp_path, loss_type=loss_type, rpo_alpha=rpo_alpha, beta=0.5)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    (pc, pr), (rc, rr), (nc, nr) = pair_logps(trainer, base_model, batch)
    beta, delta = 0.5, (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        expected = -F.logsigmoid(beta * delta).mean()  # DPO eq. 7
    elif loss_type == "hinge":
        expected = torch.relu(1 - beta * delta).mean()  # SLiC
    else:
        expected = (((pc - rc) / nc - (pr - rr) / nr) - 1 / (2 * beta)).pow(2).mean()  # IPO eq. 17, per token
    if rpo_alpha:
        expected = expected + rpo_alpha * (-pc.sum() / nc.sum())  # RPO: NLL per chosen token
    assert loss == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    metrics = trainer._metrics["eval"]
    assert metrics["rewards/margins"][-1] == pytest.approx((beta * delta).mean().item(), rel=1e-3, abs=1e-5)
    assert metrics["logps/chosen"][-1] == pytest.approx(pc.mean().item(), rel=1e-4)


def kto_formula(trainer, base_model, batch):
    policy, _ = logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref, _ = logps(base_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    kl_args = (batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    kl = max(0.0, (logps(trainer.model, *kl_args)[0] - logps(base_model, *kl_args)[0]).mean().item())
    ratio, labels = (policy - ref).tolist(), batch["label"].tolist()
    # KTO eq. 7-8: desirable 1 - sigmoid(beta (r - z0)), undesirable 1 - sigmoid(beta (z0 - r))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = [1.5 * (1 - sig(0.5 * (r - kl))) if good else 1 - sig(0.5 * (kl - r)) for r, good in zip(ratio, labels)]
    return sum(terms) / len(terms)


def test_kto_loss_equals_the_formula(tiny_llama, base_model, tmp_path):
    _, trainer, batch = make_trainer(tiny_llama, tmp_path, rlhf_type="kto", beta=0.5, desirable_weight=1.5)
    assert list(trainer.model.peft_config) == ["default"]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert sorted(batch["label"].tolist()) == [False, False, True, True]
    assert loss == pytest.approx(kto_formula(trainer, base_model, batch), rel=1e-4)


@pytest.mark.parametrize("kind", ["orpo", "simpo", "cpo"])
def test_reference_free_losses_use_the_policy_log_probs(tiny_llama, base_model, tmp_path, kind):
    from martlet.train import rlhf_losses

    _, trainer, batch = make_trainer(tiny_llama, tmp_path, rlhf_type=kind)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    (pc, pr), _, (nc, nr) = pair_logps(trainer, base_model, batch)
    fn = {"orpo": lambda: rlhf_losses.orpo_loss(pc, pr, nc, nr, beta=0.1),
          "simpo": lambda: rlhf_losses.simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=1.0),
          "cpo": lambda: rlhf_losses.cpo_loss(pc, pr, nc, nr, beta=0.1, alpha=1.0)}[kind]
    assert loss == pytest.approx(fn()[0].item(), rel=1e-4)
    assert trainer._metrics["eval"]["logps/rejected"][-1] == pytest.approx(pr.mean().item(), rel=1e-4)


def test_dpo_computes_a_pair_s_reference_once_and_reads_it_back_after(tiny_llama, base_model, tmp_path, caplog):
    """The reference is frozen, so DPO keeps each pair's reference log-probs (patch `trl_reference_cache`): a pair
    seen before, in any batch and at any place in it, runs no reference forward, and a batch of seen and new pairs
    computes the new ones alone; every loss is the formula's with the base model's log-probs."""
    _, trainer, batch = make_trainer(tiny_llama, tmp_path, beta=0.5)
    computed = []
    original = trainer.compute_ref_log_probs

    def counted(model, inputs):
        computed.append(len(inputs["input_ids"]) // 2)
        return original(model, inputs)

    def formula(batch):
        (pc, pr), (rc, rr), _ = pair_logps(trainer, base_model, batch)
        return -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr))).mean().item()

    trainer.compute_ref_log_probs = counted
    rows = [trainer.train_dataset[i] for i in range(4)]
    batches = [trainer.data_collator(rows[:2]), batch, trainer.data_collator(rows[::-1])]
    with torch.no_grad():
        losses = [trainer.compute_loss(trainer.model, b).item() for b in batches]
    assert computed == [2, 2]  # pairs 0 and 1, then 2 and 3; the reversed batch reads all four
    assert trainer.reference_cache.hits == 2 + 4 and trainer.reference_cache.misses == 4
    for b, loss in zip(batches, losses):
        assert loss == pytest.approx(formula(b), rel=1e-4, abs=1e-5)
    assert not trainer.precompute_ref_logps  # switched on for trl's call only
    assert not [r for r in caplog.records if "trl_reference_cache" in r.getMessage()]  # the guard passed


def test_kto_computes_a_row_s_reference_and_its_kl_row_s_once(tiny_llama, base_model, tmp_path, monkeypatch):
    """KTO's rows and their KL rows (fixed per row when the data is prepared) keep their reference log-probs too,
    computed in one call on both stacked (patch `trl_kto_joint_reference`, whose guard first computes the first
    batch both ways)."""
    from martlet import patches

    monkeypatch.setattr(patches, "_verdicts", {})
    _, trainer, batch = make_trainer(tiny_llama, tmp_path, rlhf_type="kto", beta=0.5, desirable_weight=1.5)
    computed = []
    original = trainer.compute_ref_log_probs

    def counted(model, inputs):
        computed.append(len(inputs["input_ids"]))
        return original(model, inputs)

    trainer.compute_ref_log_probs = counted
    rows = [trainer.train_dataset[i] for i in range(4)]
    batches = [trainer.data_collator(rows[:2]), batch, trainer.data_collator(rows[::-1])]
    with torch.no_grad():
        losses = [trainer.compute_loss(trainer.model, b).item() for b in batches]
    # the guard: trl's two-part call (2 rows) and the stacked one (2 rows + their 2 KL rows); then one stacked call
    # for each batch with rows not seen yet
    assert computed == [2, 4, 4, 4] and trainer.reference_cache.hits == 2 + 4
    assert trainer.reference_columns == ("ref_logps", "ref_KL_logps")
    for b, loss in zip(batches[1:], losses[1:]):  # (the first batch alone: labels all alike, the formula differs)
        assert loss == pytest.approx(kto_formula(trainer, base_model, b), rel=1e-4)


def test_kto_without_kl_rows_reads_back_the_replies_reference_alone(tiny_llama, tmp_path, monkeypatch):
    """apo_zero_unpaired has no KL rows: one cached column, and the loss trl computes with the reference inline."""
    from martlet.train.rlhf_trainers import ReferenceCache

    _, trainer, batch = make_trainer(tiny_llama, tmp_path, rlhf_type="kto", loss_type="apo_zero_unpaired")
    assert not trainer.calculate_KL and trainer.reference_columns == ("ref_logps",)
    assert "KL_input_ids" not in batch
    with torch.no_grad():
        computed, read_back = (trainer.compute_loss(trainer.model, batch).item() for _ in range(2))
        assert trainer.reference_cache.misses == 4 and trainer.reference_cache.hits == 4
        monkeypatch.setattr(ReferenceCache, "reads", lambda self, batch: False)  # trl's inline reference
        inline = trainer.compute_loss(trainer.model, batch).item()
    assert computed == pytest.approx(inline, rel=1e-5) and read_back == pytest.approx(inline, rel=1e-5)
