"""A transformers tokenizer as GGUF metadata: what llama.cpp (and transformers' GGUF reader) rebuild it from.

Two kinds are written. Byte-level BPE (GPT-2 style: SmolLM2, Qwen2, Llama 3) becomes
`tokenizer.ggml.model = gpt2` with the tokens spelled as in tokenizer.json, their types, the merges and
`tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp should split text with (picked as llama.cpp's
converter picks it: from the pre-tokenizer's structure, and for a generic byte-level one from a table of known
vocabularies). SentencePiece-style
BPE (byte fallback and a `▁` word marker: Llama 2, Mistral) becomes `tokenizer.ggml.model = llama` with
scores that keep the vocabulary's order. Special token ids, whether BOS/EOS are added, and the chat
template go along. `load_gguf_tokenizer` reads one back, splitting text as llama.cpp does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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


# sha256 of a vocabulary (`vocabulary_hash`) -> llama.cpp's pre-tokenizer name, for vocabularies whose
# tokenizer.json may say no more than "byte-level" (as the tokenizer transformers rebuilds from a GGUF says).
# llama.cpp's convert_hf_to_gguf.py keeps a table of the same kind, keyed by the ids of a test text.
KNOWN_VOCABULARIES = {
    # HuggingFaceTB's SmolLM2 (49,152 tokens, the tokenizer of SmolLM too): digits split one by one
    "bee029ab6e02e20cf941d5a91d9ecc5d6eedadd85ff5aa1abb792a3db7f5c345": "smollm",
}


def vocabulary_hash(spec: dict[str, Any]) -> str:
    """sha256 of the BPE vocabulary of tokenizer.json `spec`: its tokens in id order, as a JSON list. Tokens
    added on top (special tokens of a fine-tune) are not part of it."""
    vocab = (spec.get("model") or {}).get("vocab") or {}
    tokens = [text for text, _ in sorted(vocab.items(), key=lambda item: item[1])]
    return hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode("utf-8")).hexdigest()


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for how tokenizer.json `spec` splits text before BPE ('default' when unknown)."""
    name = _structure_name(spec)
    if name == "gpt-2":  # generic byte-level: a known vocabulary says which family it is
        name = KNOWN_VOCABULARIES.get(vocabulary_hash(spec), name)
    return name


def _structure_name(spec: dict[str, Any]) -> str:
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


def pre_tokenizer_for(name: str) -> Any:
    """The `tokenizers` pre-tokenizer that splits text as llama.cpp's pre-tokenizer `name` does, for the names
    transformers' GGUF reader rebuilds as plain byte-level (None for the others: the reader gets them right)."""
    from tokenizers import pre_tokenizers

    if name == "smollm":  # SmolLM2's tokenizer.json: digits one by one, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return None


def gguf_pre_tokenizer(gguf_file: str) -> str | None:
    """The `tokenizer.ggml.pre` of a GGUF file, None when it has none."""
    import gguf

    field = gguf.GGUFReader(gguf_file).fields.get("tokenizer.ggml.pre")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def load_gguf_tokenizer(gguf_file: str) -> Any:
    """transformers' tokenizer of a GGUF file, splitting text as llama.cpp does for its `tokenizer.ggml.pre`."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_file))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    pre = pre_tokenizer_for(gguf_pre_tokenizer(gguf_file) or "")
    if pre is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = pre
    return tokenizer


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
