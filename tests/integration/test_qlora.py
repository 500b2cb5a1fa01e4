"""QLoRA on a CPU: bitsandbytes 0.50 quantizes and computes 4-bit (nf4/fp4, double quantization) and 8-bit
layers without a GPU, so the whole wiring runs here: the base loads quantized, LoRA trains on top, the
checkpoint is a normal adapter that remembers the quantization. (The GPU path: scripts/gpu_check.sh.)"""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

bnb = pytest.importorskip("bitsandbytes")

from helpers import register_length_reward  # noqa: E402
from martlet.llm import SftArguments, sft_main  # noqa: E402


@pytest.mark.parametrize("bits, quant_type, double", [(4, "nf4", True), (4, "fp4", False), (8, None, None)])
def test_base_loads_quantized_with_lora_on_top(tiny_llama, bits, quant_type, double):
    from martlet.models.loader import resolve_model
    from martlet.train.model_setup import load_for_training

    extra = dict(bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double) if bits == 4 else {}
    args = SftArguments(model_id_or_path=tiny_llama, dataset=["x"], quantization_bit=bits,
                        lora_target_modules=["ALL"], **extra).validate()
    model = load_for_training(args, resolve_model(None, tiny_llama), "fp32", "cpu")
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = [m for m in model.modules() if isinstance(m, layer_type)]
    assert len(quantized) == 14  # 7 projections x 2 layers, each under a LoRA adapter
    if bits == 4:
        state = quantized[0].weight.quant_state
        assert state.quant_type == quant_type and (state.nested is True) == double
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_trains_and_its_checkpoint_says_so(tiny_llama, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"query": f"q{i}", "response": f"answer {i}"}) for i in range(8)) + "\n")
    result = sft_main(SftArguments(model_id_or_path=tiny_llama, dataset=[str(data)], quantization_bit=4,
                                   max_steps=3, batch_size=2, gradient_accumulation_steps=1, learning_rate=5e-3,
                                   logging_steps=1,
                                   output_dir=str(tmp_path / "out"), dataset_test_ratio=0, report_to=["none"]))
    ckpt = result["last_model_checkpoint"]
    weights = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    with open(os.path.join(ckpt, "sft_args.json"), encoding="utf-8") as fh:
        assert json.load(fh)["quantization_bit"] == 4  # export refuses to merge it (test_export.py)
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # finite


def test_qlora_grpo_trains_the_adapter_on_a_4bit_base(tiny_llama, tmp_path):
    from martlet.llm import RLHFArguments, rlhf_main
    result = rlhf_main(RLHFArguments(rlhf_type="grpo", model_id_or_path=tiny_llama, quantization_bit=4,
                                     dataset=["math-word-problems-small-en#8"], reward_funcs=[register_length_reward()],
                                     lora_target_modules=["ALL"], num_generations=4, batch_size=4,
                                     gradient_accumulation_steps=1, max_steps=2, max_completion_length=8, beta=0.04,
                                     learning_rate=5e-3, warmup_ratio=0.0, logging_steps=1,
                                     gradient_checkpointing=False, report_to=["none"], disable_tqdm=True,
                                     output_dir=str(tmp_path / "out")))
    ckpt = result["last_model_checkpoint"]
    weights = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    with open(os.path.join(ckpt, "sft_args.json"), encoding="utf-8") as fh:
        assert json.load(fh)["quantization_bit"] == 4
    steps = [h for h in result["log_history"] if "kl" in h]
    assert len(steps) == 2 and steps[0]["grad_norm"] > 1e-3, steps  # a real gradient through the 4-bit base
