"""Frozen weights packed for oneDNN (`martlet.train.packed`, patch `packed_weights`): torch's products, the same
values, only while they fit and only for the weights they were packed from."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from martlet import patches
from martlet.train import packed
from .test_kernels import _lora_model

MEASURED_CPU = packed._measured_cpu  # (the fixture stands in for it: an x86 CPU, whatever this one is)


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(patches, "_verdicts", {})
    monkeypatch.setattr(patches, "_warned", set())
    monkeypatch.delenv("MARTLET_PACKED_WEIGHTS", raising=False)
    monkeypatch.setattr(packed, "_measured_cpu", lambda: True)  # (an x86 CPU, whatever this one is)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 37, 64, 300])
@pytest.mark.parametrize("out", [1, 96])  # (1: a score head)
def test_packed_products_are_torch_s(dtype, rows, out):
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(out, 40, generator=g).to(dtype), torch.randn(out, generator=g).to(dtype)
    x = torch.randn(rows, 80, generator=g).to(dtype)[:, ::2]  # a strided view, as a reshape can give
    dy = torch.randn(rows, out, generator=g).to(dtype)
    want = F.linear(x, weight, bias), F.linear(x, weight), dy @ weight
    weight._martlet_packed = packed.PackedWeight.of(weight)
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(packed.linear(x, weight, bias), want[0], **tolerance)
    torch.testing.assert_close(packed.linear(x, weight), want[1], **tolerance)
    torch.testing.assert_close(packed.input_grad(dy, weight), want[2], **tolerance)


def test_a_weight_changed_after_packing_runs_torch_s_product(monkeypatch):
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 16, generator=g), requires_grad=False)
    x, dy = torch.randn(8, 16, generator=g), torch.randn(8, 32, generator=g)
    weight._martlet_packed = pw = packed.PackedWeight.of(weight)
    assert pw.fits(weight)
    with torch.no_grad():
        weight.mul_(2)  # in place: a new version
    assert not pw.fits(weight)
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a))  # would give None
    torch.testing.assert_close(packed.linear(x, weight), F.linear(x, weight))
    torch.testing.assert_close(packed.input_grad(dy, weight), dy @ weight)
    weight._martlet_packed = pw = packed.PackedWeight.of(weight)
    weight.data = torch.randn(32, 16, generator=g)  # another storage
    assert not pw.fits(weight)
    torch.testing.assert_close(packed.linear(x, weight), F.linear(x, weight))
    assert not calls


def _lean_loss_and_grads(model, batch):
    from martlet.train.loss import causal_lm_loss

    model.zero_grad()
    loss = causal_lm_loss(model, batch)  # Martlet's loss: the LM head's products in `LinearCrossEntropy`
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("qwen2", torch.float32)])  # qwen2: q/k/v biases
def test_training_on_packed_weights_gives_the_same_loss_gradients_and_reference(tiny_models, arch, dtype):
    """A LoRA model's loss and adapter gradients, and its adapters-off (reference) logits, are the same inside
    `packed_frozen_weights` as outside; inside, every fused layer's base weight and the LM head's hold a packed
    copy; after, none does."""
    from martlet.train.kernels import fuse_lora, fused_disable_adapter

    model = _lora_model(tiny_models[arch], dtype=dtype)
    fused = fuse_lora(model)
    fused_disable_adapter(model)
    ids = torch.randint(5, 200, (2, 12))
    batch = {"input_ids": ids, "labels": ids}

    def run():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss, grads = _lean_loss_and_grads(model, batch)
            with torch.no_grad(), model.disable_adapter():
                reference = model(input_ids=ids).logits
        return loss, grads, reference

    want = run()
    weights = [m.base_layer.weight for m in model.modules() if hasattr(m, "lora_A")]
    weights.append(model.get_output_embeddings().weight)  # the LM head, the lean loss's
    with packed.packed_frozen_weights(model) as count:
        assert count == fused + 1 == len(weights)
        assert all(isinstance(w.__dict__.get("_martlet_packed"), packed.PackedWeight) for w in weights)
        got = run()
    assert not any("_martlet_packed" in w.__dict__ for w in weights)
    exact = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got[0], want[0], **exact)
    torch.testing.assert_close(got[2], want[2], **exact)
    assert got[1].keys() == want[1].keys() and len(got[1]) > 0
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, **exact, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_frozen_layers_beside_lora_s_train_on_packed_copies(tiny_models, monkeypatch, dtype):
    """LoRA on q/k/v only (the llama default): the other projections' frozen weights are packed too, and run their
    forward and their input's gradient on the copies (`FrozenProduct`): the loss and the adapters' gradients are
    those of torch's products (bf16 to the bit)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from martlet.train.kernels import fuse_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=dtype, use_cache=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                             task_type="CAUSAL_LM")).train()
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn_like(param, dtype=torch.float32) * 0.1
    fuse_lora(model)
    ids = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(1))

    def run():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return _lean_loss_and_grads(model, {"input_ids": ids, "labels": ids})

    want = run()
    applied = []
    plain = packed.FrozenProduct.apply
    monkeypatch.setattr(packed.FrozenProduct, "apply", lambda *args: applied.append(1) or plain(*args))
    with packed.packed_frozen_weights(model) as count:
        assert count == 2 * 7 + 1  # (two layers' seven projections, the head)
        got = run()
    assert len(applied) == 2 * 4  # o, gate, up, down of each layer
    exact = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got[0], want[0], **exact)
    assert got[1].keys() == want[1].keys() and len(got[1]) == 2 * 3 * 2
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, **exact, msg=name)


def test_packing_is_used_by_the_products(tiny_models, monkeypatch):
    """Inside the context the base products and the loss's head run on the packed weights (not just held)."""
    from martlet.train.kernels import fuse_lora

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    layers = fuse_lora(model)
    assert packed.usable(torch.bfloat16)  # (its products: not counted)
    found = []
    plain = packed._packed_copy
    monkeypatch.setattr(packed, "_packed_copy", lambda weight: found.append(plain(weight)) or found[-1])
    ids = torch.randint(5, 200, (1, 8))
    with packed.packed_frozen_weights(model) as count, torch.autocast("cpu", dtype=torch.bfloat16):
        found.clear()  # (entering looked at every weight)
        _lean_loss_and_grads(model, {"input_ids": ids, "labels": ids})
    assert count == layers + 1 and all(p is not None for p in found)
    # each forward product, and the input's gradient where it is asked for; the loss asks whether its head is packed
    assert count < len(found) <= 2 * count + 1


def test_token_scores_on_a_packed_head_are_the_same(tiny_models):
    """Preference training's head (`TokenScores`): the same fields and gradient with the head packed."""
    from martlet.train.kernels import TokenScores

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(70, 32, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(300, 32, generator=g).to(torch.bfloat16)
    target = torch.randint(0, 300, (70,), generator=g)

    def scores():
        fields = TokenScores.apply(hidden, weight, target, 64)
        (grad,) = torch.autograd.grad(fields[0].sum(), hidden)
        return (*fields, grad)

    want = scores()
    weight._martlet_packed = packed.PackedWeight.of(weight)
    got = scores()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packing_stays_off_when_asked_or_when_the_copies_would_not_fit(tiny_models, monkeypatch):
    from martlet.train.kernels import fuse_lora

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    fuse_lora(model)
    monkeypatch.setenv("MARTLET_PACKED_WEIGHTS", "0")
    with packed.packed_frozen_weights(model) as count:
        assert count == 0
    monkeypatch.delenv("MARTLET_PACKED_WEIGHTS")
    weights = sum(w.nbytes for w in packed.frozen_cpu_weights(model))
    memory = packed.MEMORY_SHARE * 2 * weights  # exactly enough room
    monkeypatch.setattr(packed.os, "sysconf", lambda name: memory if name == "SC_PHYS_PAGES" else 1)
    with packed.packed_frozen_weights(model) as count:
        assert count > 0
    monkeypatch.setattr(packed.os, "sysconf", lambda name: memory - 1 if name == "SC_PHYS_PAGES" else 1)
    with packed.packed_frozen_weights(model) as count:
        assert count == 0
    monkeypatch.setattr(packed, "_measured_cpu", lambda: False)  # ARM: unmeasured, off
    monkeypatch.setattr(packed.os, "sysconf", lambda name: 2**40)
    with packed.packed_frozen_weights(model) as count:
        assert count == 0
    monkeypatch.setenv("MARTLET_PACKED_WEIGHTS", "1")  # forced on
    with packed.packed_frozen_weights(model) as count:
        assert count > 0
    trainable = _lora_model(tiny_models["llama"])  # peft's own layers (not fused): nothing to pack
    with packed.packed_frozen_weights(trainable) as count:
        assert count == 0


@pytest.mark.parametrize("features, measured", [(["avx2", "avx512f", "avx512_bf16"], True), (["avx2"], True),
                                                (["asimd", "sve"], False), ([], False)])
def test_packing_is_on_by_default_where_it_was_measured(monkeypatch, features, measured):
    monkeypatch.setattr(packed.native, "cpu_features", lambda: features)
    assert MEASURED_CPU() is measured


def test_without_the_private_ops_the_weights_stay_plain_and_one_warning_says_why(tiny_models, monkeypatch, caplog):
    from martlet.train.kernels import fuse_lora

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    fuse_lora(model)
    ids = torch.randint(5, 200, (1, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="martlet"):
        with packed.packed_frozen_weights(model) as count, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids).logits
    assert count == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    records = {id(r): r for r in caplog.records}.values()  # (a record can reach caplog's handler twice)
    warnings = [r.getMessage() for r in records if "'packed_weights'" in r.getMessage()]
    assert len(warnings) == 1 and "oneDNN" in warnings[0]


def _tiny_causal_lm(tiny_dir, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_model_packed_for_inference_generates_the_same(tiny_models, dtype):
    """Patch `packed_linear`: every linear layer of a plain model packed once (forward copies only), the same logits
    and greedy replies; a gradient asked for runs the layer's own forward (and gets one)."""
    model = _tiny_causal_lm(tiny_models["llama"], dtype)
    ids = torch.randint(5, 200, (2, 9))
    with torch.no_grad():
        want_logits = model(input_ids=ids).logits
        want_reply = model.generate(ids, max_new_tokens=6, do_sample=False)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert packed.pack_for_inference(model) == len(linears) > 0
    assert all(getattr(type(m), "_martlet_patch", None) == "packed_linear" for m in linears)
    assert all(m.weight._martlet_packed.backward is None for m in linears)  # one copy each
    exact = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want_logits, **exact)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want_reply)
    hidden = torch.randn(3, linears[0].in_features, dtype=dtype, requires_grad=True)
    linears[0](hidden).sum().backward()  # the layer's own forward: a gradient
    torch.testing.assert_close(hidden.grad, linears[0].weight.sum(0).expand(3, -1).to(dtype), **exact)
    assert packed.pack_for_inference(model) == len(linears)  # again: the same layers, nothing doubled


def test_inference_packing_leaves_adapter_layers_to_peft_which_merges_them(tiny_models):
    """A peft model: its LoRA layers (base and factors) stay unpacked, so merging an adapter (peft writes into the
    base weight through `.data`) is seen; the layers outside (the LM head) are packed."""
    from peft import LoraConfig, get_peft_model

    plain = _tiny_causal_lm(tiny_models["llama"], torch.float32)
    model = get_peft_model(_tiny_causal_lm(tiny_models["llama"], torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(5, 200, (2, 9))
    count = packed.pack_for_inference(model)
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert count == sum(1 for m in plain.modules() if type(m) is torch.nn.Linear) - len(adapted)
    assert all("_martlet_packed" not in m.base_layer.weight.__dict__ for m in adapted)
    assert "_martlet_packed" in model.get_output_embeddings().weight.__dict__
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_the_engine_loader_packs_a_cpu_model(tiny_models, monkeypatch):
    """`martlet infer`'s engine (infer/load.py) on a CPU packs its model, and replies as the unpacked one does;
    MARTLET_PACKED_WEIGHTS=0 leaves it plain."""
    from martlet.args.infer import InferArguments
    from martlet.infer.generation import GenConfig
    from martlet.infer.load import load_engine

    replies = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("MARTLET_PACKED_WEIGHTS", setting)
        engine = load_engine(InferArguments(model_id_or_path=tiny_models["llama"], dtype="fp32").validate())
        head = engine.model.get_output_embeddings()
        assert ("_martlet_packed" in head.weight.__dict__) is (setting == "1")
        outputs = engine.generate([[{"role": "user", "content": "Hello"}]], GenConfig(max_new_tokens=6, do_sample=False))
        replies[setting] = [o.text for o in outputs]
    assert replies["1"] == replies["0"]


def test_the_lm_head_s_generation_runs_packed_while_training(tiny_models):
    """Inside `packed_frozen_weights` the LM head's own forward (generation: GRPO's completions) runs on the packed
    copy: the same logits; after it, the head runs as before."""
    from martlet.train.kernels import fuse_lora

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    fuse_lora(model)
    head = model.get_output_embeddings()
    ids = torch.randint(5, 200, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
        with packed.packed_frozen_weights(model):
            assert getattr(type(head), "_martlet_patch", None) == "packed_linear"
            assert packed.frozen_product(head, torch.zeros(1, head.in_features, dtype=torch.bfloat16)) is not None
            got = model(input_ids=ids).logits
        assert packed.frozen_product(head, torch.zeros(1, head.in_features, dtype=torch.bfloat16)) is None
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(after, want, rtol=0, atol=0)


def test_a_lora_run_trains_on_packed_weights_and_drops_them_at_its_end(tiny_llama, tmp_path, monkeypatch):
    """`martlet sft` (train/pipeline.py) packs the frozen weights for its training loop: every step runs with them,
    and none is left on the model after the run."""
    from transformers import Trainer

    from martlet.llm import sft_main

    seen = []
    original = Trainer.training_step

    def step(self, model, *args, **kwargs):
        weights = packed.frozen_cpu_weights(model)
        seen.append((len(weights), sum(packed.packed_copy_of(w) for w in weights)))
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step)
    models = []
    monkeypatch.setattr(packed, "frozen_cpu_weights", lambda model, plain=packed.frozen_cpu_weights:
                        models.append(model) or plain(model))
    result = sft_main(["--model_id_or_path", tiny_llama, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                       "--batch_size", "2", "--dataset", "self-cognition#8", "--model_name", "M",
                       "--model_author", "B"])
    assert result["global_step"] == 2 and len(seen) >= 2  # (a step of several micro-batches: one call each)
    assert all(count == packed_count > 0 for count, packed_count in seen)
    assert models and not any("_martlet_packed" in w.__dict__ for w in packed.frozen_cpu_weights(models[0]))


def test_a_trainer_under_torch_compile_gets_no_packed_copies(tiny_models):
    """`--torch_compile true`: the compiled graphs run their own products, so no copy is made for them."""
    from types import SimpleNamespace

    from martlet.train.kernels import fuse_lora
    from martlet.train.pipeline import weights_packed_for

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    fuse_lora(model)
    weights = len(packed.frozen_cpu_weights(model))
    assert weights > 0
    for compiled, want in ((True, 0), (False, weights)):
        trainer = SimpleNamespace(model=model, args=SimpleNamespace(torch_compile=compiled))
        with weights_packed_for(trainer) as count:
            assert count == want


def test_adapters_attached_after_packing_take_their_layers_back(tiny_models, monkeypatch):
    """`martlet deploy --lora_modules`: the model is packed when loaded, the adapters wrap some of its layers after;
    packing again (idempotent) takes the copies of the wrapped layers back and keeps the others."""
    from peft import LoraConfig, get_peft_model

    model = _tiny_causal_lm(tiny_models["llama"], torch.float32)
    first = packed.pack_for_inference(model)
    q = model.model.layers[0].self_attn.q_proj
    copy = model.get_output_embeddings().weight._martlet_packed
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert "_martlet_packed" in q.weight.__dict__  # (wrapped now, still holding its copy)
    layers = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    assert packed.pack_for_inference(model) == first - layers
    assert "_martlet_packed" not in q.weight.__dict__
    assert model.get_output_embeddings().weight._martlet_packed is copy  # kept, not packed again


def _native_factors(monkeypatch, on: bool):
    """The native LoRA kernels taken as running the adapters' factors (`on`) or not, whatever this CPU has."""
    from martlet.train import native

    monkeypatch.setattr(native, "ops", (lambda: object()) if on else (lambda: None))
    monkeypatch.setattr(native, "attention_only", lambda: False)


@pytest.mark.parametrize("case", ["all packed", "factors on torch", "trainable head", "layers left plain",
                                  "a plain layer trains"])
def test_rows_go_unrounded_only_while_every_product_runs_packed(tiny_models, monkeypatch, case):
    """Inside `packed_frozen_weights` a bf16 LoRA model whose every product runs on a packed copy (base layers, LM
    head, frozen layers no adapter wraps) or in the native LoRA kernels (the factors) takes padding-free rows as they
    are (`row_multiple` 1, asked of the peft model or the model inside); outside, with the factors on torch's
    products, a trainable head or plain layer, new row lengths would build new oneDNN kernels: rows go to multiples
    of 64."""
    from martlet.train.kernels import fuse_lora, row_multiple
    from martlet.train.loss import unwrap_causal_lm

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    if case in ("layers left plain", "a plain layer trains"):  # (as if no adapter wrapped the MLPs)
        for layer in model.base_model.model.model.layers:
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(layer.mlp, name, getattr(layer.mlp, name).base_layer)
        if case == "a plain layer trains":  # (as --modules_to_save would: torch's product and its weight's gradient)
            model.base_model.model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    fuse_lora(model)
    if case == "trainable head":
        model.get_output_embeddings().weight.requires_grad_(True)
    _native_factors(monkeypatch, case != "factors on torch")
    views = (model, unwrap_causal_lm(model))
    assert [row_multiple(m, "cpu", torch.bfloat16) for m in views] == [64, 64]
    with packed.packed_frozen_weights(model) as count:
        assert count > 0
        want = 1 if case in ("all packed", "layers left plain") else 64
        assert [row_multiple(m, "cpu", torch.bfloat16) for m in views] == [want, want]
        assert row_multiple(model, "cpu", torch.float32) == 1
    assert [row_multiple(m, "cpu", torch.bfloat16) for m in views] == [64, 64]


def test_the_sft_collator_s_rows_go_unrounded_while_training_on_packed_weights(tiny_models, monkeypatch):
    """`weights_packed_for`: the padding-free collator's rows stay as long as their tokens while every product runs
    packed, and are rounded again after."""
    from types import SimpleNamespace

    from martlet.train.batching import PaddingFreeCollator
    from martlet.train.kernels import fuse_lora
    from martlet.train.pipeline import weights_packed_for

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    fuse_lora(model)
    _native_factors(monkeypatch, True)
    collator = PaddingFreeCollator(64)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(torch_compile=False), data_collator=collator)
    features = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    assert collator(features)["input_ids"].shape == (1, 64)
    with weights_packed_for(trainer):
        assert collator(features)["input_ids"].shape == (1, 5)
    assert collator(features)["input_ids"].shape == (1, 64)


def test_the_loss_s_chunks_are_not_rounded_on_a_packed_head(monkeypatch):
    """The lean loss's chunks go to 64 rows for torch's bf16 product (a repeating shape) but not on a packed head,
    with the same loss and gradient."""
    from martlet.train.kernels import LinearCrossEntropy

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(70, 32, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(300, 32, generator=g).to(torch.bfloat16)
    target = torch.randint(0, 300, (70,), generator=g)
    rows = []
    plain = packed.linear
    monkeypatch.setattr(packed, "linear", lambda x, w, b=None: rows.append(x.shape[0]) or plain(x, w, b))

    def loss():
        value = LinearCrossEntropy.apply(hidden, weight, None, target, 1024)
        return value, torch.autograd.grad(value, hidden)[0]

    want = loss()
    weight._martlet_packed = packed.PackedWeight.of(weight)
    got = loss()
    assert rows == [128, 70]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
