"""A llama-style decoder layer as one autograd node (train/fused_layer.py): the unfused layer's bits, and the
layer's own forward wherever a call is not one it takes."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import shared_prefix_row

from martlet import patches
from martlet.train import fused_layer, kernels, native, packed, varlen_attention

TREES = [(0, [9]), (4, [6, 5, 7]), (0, [3]), (2, [5, 4])]  # samples alone and after shared prefixes


@pytest.fixture(scope="module")
def built():
    assert native.ops() is not None, "the native kernels did not build: is a C++ compiler (g++) installed?"


@pytest.fixture
def applied(monkeypatch):
    """How many times a layer ran as one node, counted from here."""
    calls = []
    run = fused_layer._run
    monkeypatch.setattr(fused_layer, "_run", lambda *args: calls.append(1) or run(*args))
    return calls


def _native_everywhere(*tensors):
    """`native.usable` with the kernels on whatever this CPU's default (the tests run both paths natively)."""
    first = tensors[0]
    if first.device.type != "cpu" or any(t.dtype != first.dtype or not t.is_contiguous() for t in tensors):
        return None
    return native.ops() if first.dtype in (torch.bfloat16, torch.float32) else None


def _lora_model(path, dtype, dropout, targets="all-linear"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_cache=False,
                                                 attn_implementation=varlen_attention.register())
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                                             task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            if "lora_B" in name:
                param.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    kernels.fuse_lora(model)
    native.fuse_native(model)
    return model.train()


def _row(vocab):
    positions, _ = shared_prefix_row(TREES)
    ids = torch.randint(5, vocab, positions.shape, generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "position_ids": positions, "labels": ids}


def _loss_and_grads(model, row, dtype):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout seeds each way
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(**row).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


QKV = ["q_proj", "k_proj", "v_proj"]


@pytest.mark.parametrize("arch,dtype,dropout,targets", [
    ("llama", torch.bfloat16, 0.0, "all-linear"), ("llama", torch.bfloat16, 0.1, "all-linear"),
    ("llama", torch.float32, 0.1, "all-linear"), ("qwen2", torch.bfloat16, 0.1, "all-linear"),
    ("mistral", torch.float32, 0.0, "all-linear"), ("llama", torch.bfloat16, 0.1, QKV), ("qwen2", torch.float32, 0.0, QKV)])
def test_a_fused_layer_gives_the_unfused_layer_s_bits(built, applied, monkeypatch, tiny_models, arch, dtype, dropout,
                                                       targets):
    """LoRA on every projection or on q/k/v alone (llama's default: the others frozen, packed), the frozen weights
    packed, a padding-free row whose samples share prefixes: the loss and every adapter's gradient are those of the
    layer's own forward (each module on its native kernel, the LoRA layers' C++ node, the frozen layers'
    `FrozenProduct`) to the bit, dropout drawn from the same seeds. qwen2's q/k/v carry biases."""
    monkeypatch.setattr(native, "usable", _native_everywhere)
    model = _lora_model(tiny_models[arch], dtype, dropout, targets)
    assert fused_layer.fuse_decoder_layers(model) == 2 and fused_layer.fuse_decoder_layers(model) == 2
    row = _row(model.config.vocab_size)
    with packed.packed_frozen_weights(model):
        monkeypatch.setenv("MARTLET_FUSED_LAYER", "0")
        want_loss, want = _loss_and_grads(model, row, dtype)
        assert not applied
        monkeypatch.delenv("MARTLET_FUSED_LAYER")
        got_loss, got = _loss_and_grads(model, row, dtype)
        assert len(applied) == 2
    adapted = 7 if targets == "all-linear" else 3
    assert torch.equal(got_loss, want_loss) and got.keys() == want.keys() and len(want) == 2 * adapted * 2
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name


def test_a_checkpointed_layer_recomputes_the_same_bits(built, applied, monkeypatch, tiny_models):
    """Under activation checkpointing the node runs again in the backward pass (its dropout seeds drawn again from
    the restored generator): the input's and the adapters' gradients are those of the layer run once."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(native, "usable", _native_everywhere)
    model = _lora_model(tiny_models["llama"], torch.bfloat16, 0.1)
    fused_layer.fuse_decoder_layers(model)
    body, row = model.base_model.model.model, _row(model.config.vocab_size)
    x = body.embed_tokens(row["input_ids"]).detach().requires_grad_()
    kwargs = {"position_ids": row["position_ids"], "position_embeddings": body.rotary_emb(x, row["position_ids"])}
    results = []
    with packed.packed_frozen_weights(model):
        for checkpointed in (False, True):
            model.zero_grad(set_to_none=True)
            x.grad = None
            torch.manual_seed(3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer = body.layers[1]
                y = checkpoint(layer, x, use_reentrant=False, **kwargs) if checkpointed else layer(x, **kwargs)
            assert checkpointed or "DecoderLayerNode" in y.grad_fn.next_functions[0][0].name()  # the C++ node
            y.float().pow(2).sum().backward()
            results.append([x.grad] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(applied) == 3 and len(results[0]) == 1 + 14
    assert all(torch.equal(got, want) for got, want in zip(results[1], results[0]))


def test_calls_it_does_not_take_run_the_layer_s_own_forward(built, applied, monkeypatch, tiny_models):
    """No gradients (inference, a reference's forward), adapters switched off (LoRA's reference), a hook on a
    module it would skip, weights not packed, several rows at once: the layer's own forward, hooks called."""
    monkeypatch.setattr(native, "usable", _native_everywhere)
    model = _lora_model(tiny_models["llama"], torch.bfloat16, 0.0)
    fused_layer.fuse_decoder_layers(model)
    row = _row(model.config.vocab_size)
    _loss_and_grads(model, row, torch.bfloat16)  # no packed copies: the projections would run torch's products
    assert not applied
    with packed.packed_frozen_weights(model):
        with torch.no_grad():
            model(**row)
        with torch.no_grad(), kernels.adapters_off():
            model(**row)
        with kernels.adapters_off():
            model(**row)
        batch = {k: v.expand(2, -1) for k, v in row.items()}
        _loss_and_grads(model, batch, torch.bfloat16)
        assert not applied
        seen = []
        handle = model.base_model.model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: seen.append(1))
        _loss_and_grads(model, row, torch.bfloat16)
        assert len(applied) == 1 and seen == [1]  # layer 0 fused, layer 1 (hooked) its own forward
        handle.remove()
        _loss_and_grads(model, row, torch.bfloat16)
        assert len(applied) == 3


def test_a_changed_decoder_layer_keeps_the_library_code(built, tiny_models, caplog):
    """A release whose decoder layer puts its parts together otherwise (here: the MLP's residual scaled) fails the
    guard: the layer stays as it is, with one warning that names the patch."""
    from transformers.models.llama import modeling_llama

    class LlamaDecoderLayer(modeling_llama.LlamaDecoderLayer):
        def forward(self, hidden_states, **kwargs):
            return super().forward(hidden_states, **kwargs) * 1.5

    model = _lora_model(tiny_models["llama"], torch.float32, 0.0)
    body = model.base_model.model.model
    for i, layer in enumerate(body.layers):
        changed = LlamaDecoderLayer(body.config, i)
        changed.load_state_dict(layer.state_dict(), strict=False)
        changed.__dict__["_modules"] = layer._modules
        body.layers[i] = changed
    with caplog.at_level(logging.WARNING, logger="martlet"):
        assert fused_layer.fuse_decoder_layers(model) == 0
    assert all(type(layer) is LlamaDecoderLayer for layer in body.layers)
    assert any("native_decoder_layer" in r.getMessage() and "computes something else" in r.getMessage()
               for r in caplog.records)
    patches._verdicts.pop(("native_decoder_layer", LlamaDecoderLayer), None)


def test_the_guard_passes_on_each_architecture_it_names(tiny_models):
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen2", "mistral"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], use_cache=False)
        layer = model.model.layers[0]
        assert type(layer).__name__ in fused_layer.LLAMA_DECODER_LAYERS
        patches.PATCHES["native_decoder_layer"].guard(layer)


def test_martlet_sft_trains_its_layers_as_one_node_each(built, applied, monkeypatch, tiny_llama, tmp_path):
    """`martlet sft` (train/model_setup.py, train/pipeline.py) on its defaults (LoRA on llama's q/k/v, the other
    projections frozen and packed): every training step runs each decoder layer as one node."""
    from transformers import Trainer

    from martlet.llm import sft_main

    monkeypatch.setattr(native, "usable", _native_everywhere)
    steps = []
    original = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda self, *args, **kwargs: steps.append(len(applied))
                        or original(self, *args, **kwargs))
    result = sft_main(["--model_id_or_path", tiny_llama, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                       "--batch_size", "2", "--dataset", "self-cognition#8", "--model_name", "M",
                       "--model_author", "B", "--eval_steps", "100", "--logging_steps", "1"])
    assert result["global_step"] == 2 and len(steps) >= 2
    assert len(applied) - steps[0] >= 2 * len(steps)  # (each micro-batch's two layers, at least)
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert losses and all(0 < float(loss) < 20 for loss in losses)
