"""A memory-lean causal LM loss: logits only where a label is, a chunk at a time.

A causal LM computes logits for every position (batch x length x vocabulary; 4 x 512 x 49,152 is ~400 MB in
fp32, and the loss keeps more copies for the backward pass). Only positions whose next token carries a label
need them. This loss runs the decoder, keeps the hidden states of those positions, and computes the output
projection and cross-entropy a chunk of positions at a time, with their gradients in the same pass (softmax
minus one-hot, projected back), so at most one chunk of logits exists at once, none is kept for the backward
pass and nothing is recomputed. On SFT data, where prompts carry no loss, it also skips the output projection
for most positions.

The value is the same as transformers' `ForCausalLMLoss` (sum of token losses / number of labelled tokens, or
/ `num_items_in_batch` under gradient accumulation). Models that transform their logits (soft-capping,
logit scaling) or whose structure is not decoder + output embedding use the library's own loss.
"""

from __future__ import annotations

from typing import Any

from martlet.train.kernels import LinearCrossEntropy, cast_head

IGNORE_INDEX = -100
CHUNK = 1024


def lean_loss_supported(model: Any) -> bool:
    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return decoder is not None and head is not None and hasattr(head, "weight") and decoder is not lm


def causal_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
    """The mean token loss of `inputs` (which hold `labels`), computed without full logits.

    A bare (or peft) model runs its decoder here and the loss goes a chunk at a time. A model wrapped for
    distributed training (DDP, DeepSpeed) or compiled must be called through its wrapper, so it is asked for
    the logits of the labelled positions only (`logits_to_keep`), in one piece.
    """
    import torch

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]  # position t predicts the token at t + 1
    keep = target.ne(IGNORE_INDEX)
    count = num_items_in_batch if num_items_in_batch is not None else max(1, int(keep.sum()))
    if is_wrapped(model):
        positions = keep.any(dim=0).nonzero().flatten()
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
        y = target[:, positions]
        total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum",
                                                  ignore_index=IGNORE_INDEX)
    else:
        lm = unwrap_causal_lm(model)
        hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        total = summed_cross_entropy(hidden[keep], target[keep], lm.get_output_embeddings())
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


def summed_cross_entropy(hidden: Any, target: Any, head: Any):
    """Sum of the cross-entropies of `head(hidden)` against `target`, CHUNK positions at a time."""
    import torch

    weight, bias = head.weight, head.bias
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return LinearCrossEntropy.apply(hidden, weight, bias, target, CHUNK)
    w, b = cast_head(weight, bias, hidden.dtype)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK):
        logits = torch.nn.functional.linear(hidden[start:start + CHUNK], w, b).float()
        total = total + torch.nn.functional.cross_entropy(logits, target[start:start + CHUNK], reduction="sum")
    return total


def is_wrapped(model: Any) -> bool:
    return hasattr(model, "_orig_mod") or (hasattr(model, "module") and not hasattr(model, "get_decoder"))


def unwrap_causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside DDP / peft wrappers (LoRA layers are injected in place)."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
