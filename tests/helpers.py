"""Test helpers: tiny models of several architectures and sample conversations."""

from __future__ import annotations

import json
import os

# architecture -> the named template its tiny model carries (the SmolLM2 tokenizer has ChatML)
ARCH_TEMPLATES = {"llama": "tokenizer", "qwen2": "qwen", "mistral": "mistral", "gemma": "gemma"}
EXTRA_SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "5 × 4 = 20. 二十。"},
]


def build_tiny_model(arch: str, folder: str, tokenizer_dir: str) -> str:
    """A 2-layer random model of `arch` with the SmolLM2 tokenizer (+ a few special tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from martlet.templates import template_entry

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL})
    if ARCH_TEMPLATES[arch] != "tokenizer":
        tokenizer.chat_template = template_entry(ARCH_TEMPLATES[arch])["jinja"]
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if arch == "gemma":
        kwargs["head_dim"] = 16
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def run_dirs(output_dir: str) -> list[str]:
    found = []
    for model_type in sorted(os.listdir(output_dir)):
        for run in sorted(os.listdir(os.path.join(output_dir, model_type))):
            found.append(os.path.join(output_dir, model_type, run))
    return found


def adapter_copy(ckpt: str, folder: str, b_std: float, seed: int = 0) -> str:
    """A copy of the LoRA checkpoint `ckpt` in `folder` whose B matrices are N(0, b_std) (0: all zero, the
    adapter then leaves the base model as it is). A tiny random model answers every prompt alike with or
    without a few steps' adapter; a noisy one moves its logits, so a test can tell whether it was loaded."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, folder)
    path = os.path.join(folder, "adapter_model.safetensors")
    weights = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = (torch.randn(tensor.shape, generator=generator) * b_std).to(tensor.dtype)
    save_file(weights, path, metadata={"format": "pt"})
    return folder


# A small SFT job for the resume and reliability tests: twelve spelling rows, 6 steps, a checkpoint every 2
SPELL_ROWS = [{"query": f"Spell {w}", "response": " ".join(w)} for w in
              ("cat", "dog", "bird", "fish", "lion", "mouse", "horse", "sheep", "goat", "camel", "zebra", "panda")]


def spell_argv(model, data, out, **extra) -> list[str]:
    """`martlet sft` arguments of that job; `extra` overrides or adds (--name value)."""
    base = {"model_id_or_path": model, "dataset": data, "output_dir": out, "max_steps": "6", "batch_size": "2",
            "gradient_accumulation_steps": "1", "save_steps": "2", "eval_steps": "2", "dataset_test_ratio": "0",
            "report_to": "none", "learning_rate": "5e-3", "save_total_limit": "10", "logging_steps": "1"}
    base.update(extra)
    return [item for key, value in base.items() for item in (f"--{key}", value)]


def register_length_reward() -> str:
    """Register (once) a GRPO reward that tiny random models give a signal on: the length of each completion's text
    varies within a group. Returns its name."""
    from martlet.train.rewards import register_reward_func

    def characters(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    register_reward_func("characters", characters)
    return "characters"


def shared_prefix_row(trees):
    """A padding-free row of (prefix, [trunk length, branch lengths...]) trees, as the collators lay samples that
    begin alike: its (1, T) position ids, and each whole sequence's token indices in the row (a branch: its trunk's
    first `prefix` tokens, then its own)."""
    import torch

    sequences, positions = [], []
    for prefix, (first, *branches) in trees:
        trunk = list(range(len(positions), len(positions) + prefix + first))
        sequences.append(trunk)
        positions += range(prefix + first)
        for n in branches:
            sequences.append(trunk[:prefix] + list(range(len(positions), len(positions) + n)))
            positions += range(prefix, prefix + n)
    return torch.tensor(positions)[None], sequences
