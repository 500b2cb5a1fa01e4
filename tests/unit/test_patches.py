"""The registry of library patches (`martlet.patches`): every patch is listed with its guard, each guard falls back
to the library's own code with one warning when its target changed shape, and no module of src/ but the registry
assigns to another library's objects.

That each patch computes what the unpatched library computes is tested beside its feature: native_rms_norm,
native_mlp, native_rotary in test_native.py (values and gradients of whole models); fused_lora in test_kernels.py;
peft_input_cast_off below; trl_compact_scoring and trl_padding_free_forward in test_dpo_padding_free.py;
trl_pretokenized_rows in test_rlhf.py (DPO/KTO train on Martlet's rows); trl_reference_cache in test_rlhf.py and
test_rlhf_reference.py (the loss, and a second epoch without the reference's forward); atomic_checkpoint in
test_reliability.py (kill mid-save, resume)."""

from __future__ import annotations

import ast
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from martlet import patches
from martlet.errors import MartletError
from martlet.train import packed

SRC = Path(__file__).resolve().parents[2] / "src" / "martlet"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test sees guards not yet run and warnings not yet given."""
    monkeypatch.setattr(patches, "_verdicts", {})
    monkeypatch.setattr(patches, "_warned", set())


def _warnings(caplog, name):
    records = {id(r): r for r in caplog.records}.values()  # (a record can reach caplog's handler twice)
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and f"'{name}'" in r.getMessage()]


def test_every_patch_says_what_it_changes_where_it_was_checked_and_has_a_guard():
    assert len(patches.PATCHES) >= 10
    for name, patch in patches.PATCHES.items():
        assert patch.name == name and patch.library in ("torch", "transformers", "peft", "trl", "accelerate")
        assert patch.checked and all(v[0].isdigit() for v in patch.checked), name
        assert "Guard:" in patch.what and len(patch.what) > 80, name
        assert callable(patch.guard), name
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    assert all(name in tests for name in patches.PATCHES)  # each is named by the test that checks it
    for lang in ("en", "zh"):  # and listed in the docs' table
        page = (SRC.parents[1] / "docs" / lang / "dependencies.md").read_text()
        assert all(f"| `{name}` |" in page for name in patches.PATCHES), lang


def test_the_guards_pass_on_the_locked_libraries(tiny_llama):
    """On the versions of requirements/lock.txt every patch applies (no warning): the speed is there."""
    import transformers
    import trl
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.generation import utils as generation_utils
    from transformers.models.llama import modeling_llama

    patches.restore_globals()  # the library's own globals (an earlier test of this process may have patched them)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    layers = lora.base_model.model.model.layers[0]
    for name, target in (("native_rms_norm", layers.input_layernorm), ("native_mlp", layers.mlp),
                         ("native_decoder_layer", layers),
                         ("native_rotary", modeling_llama), ("fused_lora", layer), ("peft_input_cast_off", layer),
                         ("trl_compact_scoring", trl_utils), ("trl_pretokenized_rows", trl.DPOTrainer),
                         ("trl_pretokenized_rows", trl.KTOTrainer), ("trl_padding_free_precompute", trl.DPOTrainer),
                         ("trl_padding_free_precompute", trl.KTOTrainer), ("atomic_checkpoint", transformers.Trainer),
                         ("fast_cpu_sampling", generation_utils), ("packed_weights", (torch.bfloat16, packed.probe)),
                         ("packed_weights", (torch.float32, packed.probe)), ("packed_linear", (torch.float32, packed.probe)),
                         ("accelerate_bypass_device_map", None)):
        patches.PATCHES[name].guard(target)


def test_the_reference_cache_needs_trl_s_hook_and_switch():
    """`trl_reference_cache` hands cached log-probs in through trl's `precompute_ref_logps` switch and computes the
    missing ones with `compute_ref_log_probs(model, inputs)`; a trainer without either keeps trl's inline reference."""
    import trl

    class Trainer(trl.DPOTrainer):
        def __init__(self):  # (no model: the guard reads the hook and the switch alone)
            self.precompute_ref_logps = False

    patches.PATCHES["trl_reference_cache"].guard(Trainer())

    class OtherHook(Trainer):
        def compute_ref_log_probs(self, model, inputs, cache):
            pass

    class NoSwitch(Trainer):
        def __init__(self):
            pass

    with pytest.raises(patches.Mismatch, match=r"takes \('model', 'inputs', 'cache'\)"):
        patches.PATCHES["trl_reference_cache"].guard(OtherHook())
    with pytest.raises(patches.Mismatch, match="precompute_ref_logps"):
        patches.PATCHES["trl_reference_cache"].guard(NoSwitch())


def test_trl_token_scores_stands_in_for_trl_s_head_only_where_it_gives_the_same_fields(tiny_llama, caplog,
                                                                                       monkeypatch):
    """The guard of `trl_token_scores` compares trl's fused head with Martlet's scoring on a tiny row: on the locked
    trl they agree; a head that also returns a field Martlet does not compute (as a new trl release might) turns
    the patch off, with one warning, and trl's own head gives the fields."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from martlet.train import rlhf_trainers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    model.get_output_embeddings().weight.requires_grad_(False)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    rlhf_trainers.padding_free_fused_forward(model)
    patches.PATCHES["trl_token_scores"].guard((model, rlhf_trainers.head_fields_side_by_side))

    side_by_side = rlhf_trainers.head_fields_side_by_side

    def with_extra_field(lm):
        want, got = side_by_side(lm)
        want["log_sum_sq_probs"] = torch.zeros_like(want["log_probs"])
        return want, got

    with pytest.raises(patches.Mismatch, match="log_sum_sq_probs"):
        patches.PATCHES["trl_token_scores"].guard((model, with_extra_field))
    assert rlhf_trainers._scores_itself(model, {})  # on a CPU, with or without the native kernels
    other = AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    other.get_output_embeddings().weight.requires_grad_(False)
    add_fused_lm_head(other, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    rlhf_trainers.padding_free_fused_forward(other)
    monkeypatch.setattr(rlhf_trainers, "head_fields_side_by_side", with_extra_field)
    assert not rlhf_trainers._scores_itself(other, {})
    assert "log_sum_sq_probs" in _warnings(caplog, "trl_token_scores")[0]
    assert not rlhf_trainers._scores_itself(other, {"temperature": 0.7})  # GRPO's call: trl's head


def test_trl_s_head_scores_a_reference_whose_product_autocast_would_cast(tiny_llama, caplog, monkeypatch):
    """Full DPO or KTO on a CPU with bf16: the reference copy keeps fp32 weights and runs under bf16 autocast, where
    trl's head computes its product in bf16 and `TokenScores` would in fp32. Not the same values: trl's head scores
    it, and the guard neither runs nor warns (it used to, once a run); in the weights' own dtype Martlet scores."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from martlet.train import rlhf_trainers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    model.get_output_embeddings().weight.requires_grad_(False)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    rlhf_trainers.padding_free_fused_forward(model)
    guarded = []
    real = rlhf_trainers.head_fields_side_by_side
    monkeypatch.setattr(rlhf_trainers, "head_fields_side_by_side", lambda lm: guarded.append(lm) or real(lm))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not rlhf_trainers._scores_itself(model, {})
    assert guarded == [] and _warnings(caplog, "trl_token_scores") == []
    assert rlhf_trainers._scores_itself(model, {}) and guarded == [model]  # fp32 weights, no autocast


def test_a_changed_norm_keeps_the_library_code_and_warns_once(tiny_llama, caplog):
    from transformers import AutoModelForCausalLM

    from martlet.train import native

    class LlamaRMSNorm(torch.nn.Module):  # the registered name, another computation (a release that changed it)
        def __init__(self, weight):
            super().__init__()
            self.weight, self.variance_epsilon = weight, 1e-6

        def forward(self, x):
            return x * self.weight + 1

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for layer in model.model.layers:
        layer.input_layernorm = LlamaRMSNorm(layer.input_layernorm.weight)
    ids = torch.randint(5, 200, (1, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        native.fuse_native(model)
        got = model(input_ids=ids).logits
    assert all(type(layer.input_layernorm).forward is LlamaRMSNorm.forward
               and "forward" not in vars(layer.input_layernorm) for layer in model.model.layers)
    torch.testing.assert_close(got, want)
    (message,) = _warnings(caplog, "native_rms_norm")  # one warning for all the layers
    assert "LlamaRMSNorm.forward computes something else" in message
    assert f"transformers {patches.version('transformers')}" in message and "library's own code runs" in message


def test_a_changed_mlp_keeps_the_library_code(tiny_llama, caplog):
    from transformers import AutoModelForCausalLM

    from martlet.train import native

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    mlp_class = type(model.model.layers[0].mlp)

    class LlamaMLP(mlp_class):  # same parts, gate and up swapped
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    for layer in model.model.layers:
        layer.mlp.__class__ = LlamaMLP
    native.fuse_native(model)
    assert not any("forward" in vars(layer.mlp) for layer in model.model.layers)
    assert "LlamaMLP.forward computes something else" in _warnings(caplog, "native_mlp")[0]


def test_a_changed_rotary_function_is_left_in_place(caplog):
    from martlet.train import native

    library = types.ModuleType("fake_modeling")
    library.apply_rotary_pos_emb = lambda q, k, cos, sin, unsqueeze_dim=1: (q * cos[:, None], k * cos[:, None])

    class LlamaAttention(torch.nn.Module):
        def forward(self, x):
            return library.apply_rotary_pos_emb(x, x, x[0], x[0])

    LlamaAttention.__module__ = library.__name__
    sys.modules[library.__name__] = library
    try:
        original = library.apply_rotary_pos_emb
        attention = LlamaAttention()
        assert native.fuse_native(attention) == 0
        assert library.apply_rotary_pos_emb is original and "forward" not in vars(attention)
    finally:
        del sys.modules[library.__name__]
    assert "apply_rotary_pos_emb computes something else" in _warnings(caplog, "native_rotary")[0]


def test_a_changed_lora_layer_goes_to_peft(tiny_llama, monkeypatch, caplog):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear
    from transformers import AutoModelForCausalLM

    from martlet.train.kernels import fuse_lora

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    forward = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, x, *a, **k: forward(self, x, *a, **k) * 2)  # a new peft
    assert fuse_lora(model) == 0
    assert "Linear.forward computes something else" in _warnings(caplog, "fused_lora")[0]
    monkeypatch.undo()
    monkeypatch.setattr(patches, "_verdicts", {})
    assert fuse_lora(model) == 2 * model.config.num_hidden_layers  # the guard's probe left the weights as they were


def test_the_lora_guard_puts_b_back(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM", lora_dropout=0.5))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    model.train()
    patches.PATCHES["fused_lora"].guard(layer)
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters()) and layer.training


def test_input_casting_off_gives_the_same_adapter_output_under_autocast(tiny_llama, caplog):
    """peft_input_cast_off: bf16 activations straight into the fp32 adapter under bf16 autocast, as peft's own cast
    would give; a layer without the attribute is left alone with a warning."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        assert patches.patch_attribute("peft_input_cast_off", layer, "cast_input_dtype_enabled", False)
        got = layer(x)
    assert layer.cast_input_dtype_enabled is False
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    bare = torch.nn.Linear(2, 2)
    assert not patches.patch_attribute("peft_input_cast_off", bare, "cast_input_dtype_enabled", False)
    assert not hasattr(bare, "cast_input_dtype_enabled")
    assert "Linear has no cast_input_dtype_enabled" in _warnings(caplog, "peft_input_cast_off")[0]


def test_trl_changes_keep_trl_s_forward(tiny_llama, caplog):
    from transformers import AutoModelForCausalLM

    from martlet.train.rlhf_trainers import padding_free_fused_forward

    utils = types.ModuleType("trl_utils")
    utils._use_triton = lambda device, kernel: False  # another signature
    assert not patches.patch_global("trl_compact_scoring", utils, "_use_triton", lambda original: None)
    assert "_use_triton takes ('device', 'kernel')" in _warnings(caplog, "trl_compact_scoring")[0]

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # no add_fused_lm_head: no fused_lm_head argument
    padding_free_fused_forward(model)
    assert "forward" not in vars(model)
    assert "takes no fused_lm_head" in _warnings(caplog, "trl_padding_free_forward")[0]


def test_trl_tokenizing_its_own_way_stops_the_run():
    class DPOTrainer:
        def _prepare_dataset(self, dataset, tokenizer):  # a trl whose hook changed
            return dataset

    with pytest.raises(MartletError, match="patch 'trl_pretokenized_rows' does not fit trl .*_prepare_dataset"):
        patches.require("trl_pretokenized_rows", DPOTrainer, key=DPOTrainer)


def test_a_changed_save_hook_falls_back_to_the_library_save(caplog):
    class Trainer:
        def _save_checkpoint(self, model, trial, metrics):
            pass

    assert not patches.usable("atomic_checkpoint", Trainer, key=Trainer)
    (message,) = _warnings(caplog, "atomic_checkpoint")
    assert "Trainer._save_checkpoint takes ('model', 'trial', 'metrics')" in message
    assert "the library's own save runs" in message


def test_another_accelerate_gets_no_environment_switch(monkeypatch, caplog):
    monkeypatch.delenv("ACCELERATE_BYPASS_DEVICE_MAP", raising=False)
    monkeypatch.setattr(patches, "version", lambda library: "2.0.0")
    assert not patches.patch_environment("accelerate_bypass_device_map", "ACCELERATE_BYPASS_DEVICE_MAP", "true")
    assert "ACCELERATE_BYPASS_DEVICE_MAP" not in __import__("os").environ
    assert "accelerate 2.0.0" in _warnings(caplog, "accelerate_bypass_device_map")[0]


# ---- the rule: no assignment to another library's objects outside the registry --------------------------------
def _third_party_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                top = (module or alias.name).split(".")[0]
                if top not in ("martlet", "__future__") and top not in sys.stdlib_module_names:
                    names.add((alias.asname or alias.name).split(".")[0])
    return names


def _library_assignments(path: Path, root: Path = SRC) -> list[str]:
    tree = ast.parse(path.read_text())
    libraries = _third_party_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if not isinstance(target, ast.Attribute):
                continue
            base = target.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if (isinstance(base, ast.Name) and base.id in libraries) or target.attr == "forward":
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(target)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in libraries):
            found.append(f"{path.relative_to(root)}:{node.lineno}: setattr({node.args[0].id}, ...)")
    return found


def test_no_module_but_the_registry_assigns_to_another_library():
    found = [hit for path in sorted(SRC.rglob("*.py")) if path.name != "patches.py"
             for hit in _library_assignments(path)]
    assert found == []


def test_the_rule_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import trl.trainer.utils as u\nfrom transformers import Trainer\n\n"
                   "def f(m):\n    u._use_triton = None\n    Trainer.x = 1\n    m.forward = None\n"
                   "    setattr(u, 'y', 2)\n")
    assert [hit.split(": ", 1)[1] for hit in _library_assignments(bad, tmp_path)] == [
        "u._use_triton", "Trainer.x", "m.forward", "setattr(u, ...)"]


def test_trl_kto_joint_reference_is_used_only_where_the_stacked_call_gives_trl_s_values():
    """The guard of `trl_kto_joint_reference` computes a batch's KTO reference log-probs both ways: a trl whose
    `compute_ref_log_probs` honours `calculate_KL` passes; one that scores the KL rows regardless (an error on the
    stacked batch) or gives other values fails with a Mismatch, never an exception of its own."""
    from martlet.train.rlhf_trainers import PaddingFreeReference

    def row_sums(ids, mask):
        return (ids * mask).sum(1).float()

    class FakeKTO(PaddingFreeReference):
        calculate_KL = True
        processing_class = None

        def __init__(self, shift=0.0, strict=False):  # (no trl __init__: the guard only calls these)
            self.shift, self.strict = shift, strict

        def compute_ref_log_probs(self, model, inputs):
            main = row_sums(inputs["input_ids"], inputs["attention_mask"]) + self.shift * (len(inputs["input_ids"]) > 2)
            if self.calculate_KL or self.strict:
                return main, row_sums(inputs["KL_input_ids"], inputs["KL_attention_mask"])
            return main, None

    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": torch.randint(1, 50, (2, 5), generator=g), "attention_mask": torch.ones(2, 5, dtype=torch.long),
            "completion_mask": torch.ones(2, 5, dtype=torch.long), "KL_input_ids": torch.randint(1, 50, (2, 7), generator=g),
            "KL_attention_mask": torch.ones(2, 7, dtype=torch.long), "KL_completion_mask": torch.ones(2, 7, dtype=torch.long),
            "label": torch.tensor([True, False])}
    guard = patches.PATCHES["trl_kto_joint_reference"].guard
    trainer = FakeKTO()
    guard((trainer, None, rows))
    assert trainer.calculate_KL is True  # switched back after the call
    replies, kl_rows = trainer._joint_reference_log_probs(None, rows)
    torch.testing.assert_close(replies, row_sums(rows["input_ids"], rows["attention_mask"]))
    torch.testing.assert_close(kl_rows, row_sums(rows["KL_input_ids"], rows["KL_attention_mask"]))
    with pytest.raises(patches.Mismatch, match="fails on the stacked batch"):
        guard((FakeKTO(strict=True), None, rows))
    with pytest.raises(patches.Mismatch, match="reference log-probs from the stacked batch"):
        guard((FakeKTO(shift=5.0), None, rows))
