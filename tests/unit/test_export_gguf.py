"""GGUF building blocks: the rotary row order llama.cpp wants, Llama 3.1 rope factors, tensor types per file type,
the pre-tokenizer names llama.cpp knows."""

import json

import numpy as np
import pytest

from martlet.export.gguf_vocab import KNOWN_VOCABULARIES, pre_tokenizer_for, pre_tokenizer_name, vocabulary_hash
from martlet.export.to_gguf import llama3_rope_factors, permute_rotary, tensor_type


@pytest.mark.parametrize("n_head, rows, cols", [(4, 64, 24), (2, 32, 24), (3, 48, 1)])
def test_permute_rotary_is_undone_by_transformers_gguf_reader(n_head, rows, cols):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    if cols == 1:
        weights = weights[:, 0]  # a bias
    permuted = permute_rotary(weights, n_head)
    assert not np.array_equal(permuted, weights)
    # in each head, rows i and i + half of transformers' layout become neighbours
    half = rows // n_head // 2
    assert np.array_equal(permuted[1], weights[half]) and np.array_equal(permuted[2], weights[1])
    restored = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_head)
    assert np.array_equal(restored, weights)


def test_llama3_rope_factors_match_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope,
                         max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    factors = torch.tensor(llama3_rope_factors(rope, 500000.0, 64), dtype=torch.float64)
    assert torch.allclose(plain / factors, scaled.double(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 32.0


@pytest.mark.parametrize("name, shape, gguf_type, expected", [
    ("blk.0.attn_norm.weight", (64,), "q4_0", "F32"),
    ("blk.0.attn_q.bias", (64,), "f16", "F32"),
    ("blk.0.attn_q.weight", (64, 64), "f16", "F16"),
    ("blk.0.attn_q.weight", (64, 64), "bf16", "BF16"),
    ("blk.0.attn_q.weight", (64, 64), "q8_0", "Q8_0"),
    ("blk.0.attn_q.weight", (64, 64), "q4_0", "Q4_0"),
    ("token_embd.weight", (100, 64), "q4_0", "Q8_0"),
    ("output.weight", (100, 64), "q4_0", "Q8_0"),
    ("blk.0.ffn_down.weight", (64, 48), "q4_0", "F16"),  # 48 does not split into blocks of 32
    ("blk.0.attn_q.weight", (64, 64), "f32", "F32"),
])
def test_tensor_types(name, shape, gguf_type, expected):
    assert tensor_type(name, shape, gguf_type).name == expected


def _split(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


def test_pre_tokenizer_names():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from martlet.export.gguf_vocab import _LLAMA3_SPLIT

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": _split(PRETOKENIZE_REGEX)}) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": _split(_LLAMA3_SPLIT)}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": _split("[a-z]+")}) == "default"


def test_transformers_knows_the_names_we_write():
    """transformers' GGUF reader splits text for these names the way the tokenizer.json did."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from martlet.export.gguf_vocab import _LLAMA3_SPLIT

    assert GGUF_PRE_TOKENIZER_SPLITS["qwen2"] == PRETOKENIZE_REGEX
    assert GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"] == _LLAMA3_SPLIT


def _with_pre_tokenizer(tokenizer, pre_tokenizer):
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = pre_tokenizer
    return spec


def test_a_smollm2_vocabulary_is_smollm_whatever_its_pre_tokenizer_says(tokenizer):
    """As llama.cpp's converter does: a generic byte-level pre-tokenizer (what transformers rebuilds from a
    GGUF) on SmolLM2's vocabulary is still 'smollm'; the same pre-tokenizer on another vocabulary is GPT-2's."""
    from martlet.export.gguf_vocab import _LLAMA3_SPLIT

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = _with_pre_tokenizer(tokenizer, byte_level)
    assert vocabulary_hash(spec) in KNOWN_VOCABULARIES
    assert pre_tokenizer_name(spec) == "smollm"
    other = _with_pre_tokenizer(tokenizer, byte_level)
    other["model"]["vocab"]["zzz-not-smollm"] = other["model"]["vocab"].pop("Hello")
    assert pre_tokenizer_name(other) == "gpt-2"
    # the structure still wins where it names a family: a Llama 3 split on this vocabulary stays 'llama-bpe'
    assert pre_tokenizer_name(_with_pre_tokenizer(tokenizer, _split(_LLAMA3_SPLIT))) == "llama-bpe"


def test_tokens_added_by_a_fine_tune_keep_the_vocabulary_known(tokenizer):
    copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    copy.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    assert len(copy) == len(tokenizer) + 2
    assert vocabulary_hash(json.loads(copy.backend_tokenizer.to_str())) in KNOWN_VOCABULARIES


def test_the_embedded_tokenizer_splits_digits_like_smollm2(tokenizer):
    """The embedded model's tokenizer (converted from its GGUF) has SmolLM2's own pre-tokenizer back."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert [step["type"] for step in spec["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tokenizer.tokenize("x  42") == ["x", "ĠĠ", "4", "2"]  # GPT-2's split alone gives 'Ġ', 'Ġ', '4', '2'


def test_pre_tokenizer_for_the_gguf_names():
    assert pre_tokenizer_for("smollm").pre_tokenize_str("In 2024") == [
        ("In", (0, 2)), ("Ġ", (2, 3)), ("2", (3, 4)), ("0", (4, 5)), ("2", (5, 6)), ("4", (6, 7))]
    assert pre_tokenizer_for("qwen2") is None  # transformers' reader rebuilds those itself
