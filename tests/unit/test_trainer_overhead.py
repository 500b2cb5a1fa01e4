"""`LightStepMixin`: the Trainer's FLOP estimate and gradient clipping without walking the whole model every step,
with the library's values."""

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from martlet.train.trainer import MartletTrainer


def _trainer(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_grad_norm=0.5, report_to=[])
    return MartletTrainer(model=model, args=args)


def test_the_flop_estimate_is_the_library_s_with_the_parameters_counted_once(tiny_llama, tmp_path, monkeypatch):
    trainer = _trainer(tiny_llama, tmp_path)
    inputs = {"input_ids": torch.ones(2, 37, dtype=torch.long), "labels": torch.ones(2, 37, dtype=torch.long)}
    want = Trainer.floating_point_ops(trainer, inputs)
    assert want > 0
    base = trainer.model.get_base_model()
    counted = []
    original = type(base).num_parameters
    monkeypatch.setattr(type(base), "num_parameters",
                        lambda self, *a, **k: counted.append(1) or original(self, *a, **k))
    assert [trainer.floating_point_ops(inputs) for _ in range(3)] == [want] * 3
    assert len(counted) == 1
    assert trainer.floating_point_ops({"pixel_values": torch.ones(1)}) == 0  # no main input: the library's answer


def test_clipping_gives_the_library_s_norm_and_gradients_and_sees_unfrozen_parameters(tiny_llama, tmp_path):
    trainer = _trainer(tiny_llama, tmp_path)
    model = trainer.model
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.grad = torch.randn(p.shape, generator=g) * 3
        trainable[0].grad = None  # a parameter without a gradient this step
        if step == 1:  # a frozen parameter unfrozen during training, with a gradient
            frozen = next(p for p in model.parameters() if not p.requires_grad)
            frozen.requires_grad_(True)
            frozen.grad = torch.randn(frozen.shape, generator=g) * 3
        reference = copy.deepcopy(model)
        for p, q in zip(model.parameters(), reference.parameters()):
            q.requires_grad_(p.requires_grad)
            q.grad = None if p.grad is None else p.grad.clone()
        want = Trainer._clip_grad_norm(trainer, reference)
        got = trainer._clip_grad_norm(model)
        torch.testing.assert_close(got, want)
        assert float(want) > 0.5  # clipping happened
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, msg=name)
