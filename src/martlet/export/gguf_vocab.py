"""A transformers tokenizer as GGUF metadata: what llama.cpp (and transformers' GGUF reader) rebuild it from.

Two kinds are written. Byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama 3) becomes
`tokenizer.ggml.model = gpt2` with the tokens spelled as in tokenizer.json, their types, the merges and
`tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp should split text with. SentencePiece-style
BPE (byte fallback and a `▁` word marker: Llama 2, Mistral) becomes `tokenizer.ggml.model = llama` with
scores that keep the vocabulary's order. Special token ids, whether BOS/EOS are added, and the chat
template go along.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from martlet.errors import MartletError

logger = logging.getLogger("martlet")

# tokenizer.ggml.token_type values (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of well-known pre-tokenizers -> the name llama.cpp (and transformers' reader) know them by.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _known_splits() -> dict[str, str]:
    known = {_LLAMA3_SPLIT: "llama-bpe"}
    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        known[PRETOKENIZE_REGEX] = "qwen2"
    except ImportError:  # an older transformers: Qwen2 tokenizers then export as 'default'
        pass
    return known


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for how tokenizer.json `spec` splits text before BPE ('default' when unknown)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        name = _known_splits().get((steps[0].get("pattern") or {}).get("Regex", ""))
        if name:
            return name
    logger.warning("unknown pre-tokenizer %s: written as 'default'; llama.cpp may split text differently than "
                   "transformers does.", kinds)
    return "default"


def _is_byte_level(spec: dict[str, Any]) -> bool:
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return '"ByteLevel"' in text


def adds_token(tokenizer: Any, token_id: int | None, where: int) -> bool:
    """True when encoding plain text adds `token_id` at position `where` (0: first, -1: last)."""
    if token_id is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[where] == token_id


def _token_table(tokenizer: Any, vocab: dict[str, int], size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order and their types; ids past the tokenizer (a padded embedding) become [PAD<i>]."""
    added = tokenizer.added_tokens_decoder
    largest = max([*vocab.values(), *added.keys()])
    if largest >= size:
        raise MartletError(f"the tokenizer has token id {largest}, past the model's embedding ({size} rows).",
                           hint="Export the tokenizer that was trained with the model.")
    tokens: list[str | None] = [None] * size
    types = [NORMAL] * size
    for text, index in vocab.items():
        tokens[index] = text
    for index, token in added.items():
        tokens[index] = token.content
        types[index] = CONTROL if token.special else USER_DEFINED
    for index, text in enumerate(tokens):
        if text is None:
            tokens[index], types[index] = f"[PAD{index}]", UNUSED
    return tokens, types  # type: ignore[return-value]


def _merges(spec: dict[str, Any]) -> list[str]:
    return [" ".join(m) if isinstance(m, (list, tuple)) else m for m in spec["model"].get("merges", [])]


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, chat_template: str | None,
                  eot_token: str | None = None) -> str:
    """Write `tokenizer` into the GGUF `writer`; returns the tokenizer kind ('gpt2' or 'llama')."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise MartletError(f"a {model.get('type')} tokenizer cannot be written to GGUF by Martlet yet (BPE only).",
                           hint="Convert with llama.cpp's convert_hf_to_gguf.py instead.")
    tokens, types = _token_table(tokenizer, model["vocab"], vocab_size)
    if _is_byte_level(spec):
        kind = "gpt2"
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    elif model.get("byte_fallback"):
        kind = "llama"
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        for index, text in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", text):  # byte fallback pieces, even when listed as added
                types[index] = BYTE
        # SentencePiece orders its pieces best-first: a falling score keeps that order for llama.cpp.
        writer.add_token_scores([0.0 if types[i] != NORMAL else -float(i) for i in range(len(tokens))])
        writer.add_add_space_prefix('"prepend_scheme": "always"' in json.dumps(spec.get("pre_tokenizer"))
                                    or '"Prepend"' in json.dumps(spec.get("normalizer")))
    else:
        raise MartletError("this BPE tokenizer is neither byte-level nor SentencePiece-style: Martlet cannot "
                           "write it to GGUF.", hint="Convert with llama.cpp's convert_hf_to_gguf.py instead.")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = _merges(spec)
    if merges:
        writer.add_token_merges(merges)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    for name, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    if eot_token and eot_token != tokenizer.eos_token and eot_token in tokenizer.get_vocab():
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot_token))
    writer.add_add_bos_token(adds_token(tokenizer, ids["bos"], 0))
    writer.add_add_eos_token(adds_token(tokenizer, ids["eos"], -1))
    if chat_template:
        writer.add_chat_template(chat_template)
    return kind
