"""Attention for padding-free rows on a CPU: each sample attends on its own.

A padding-free row holds several samples end to end; their position ids restart at 0. transformers' sdpa path
turns that into one block-diagonal mask over the whole row, and torch's CPU attention kernels then compute
every block of the row x row square, masked or not. Here the row is cut at the restarts and each sample runs
causal attention alone: short samples through plain matrix products (for a few hundred tokens the fastest on
a CPU), longer ones through sdpa with `is_causal` (which skips the upper triangle). Same result as the mask,
at a fraction of the work: about half the attention time of a step of four ~100-token samples on SmolLM2.

Registered with transformers as the attention implementation "martlet_varlen" (the mask function is sdpa's,
so a padded batch or generation simply runs sdpa). Anything it does not handle (a batch of several rows,
attention dropout, soft-capping, sinks, a sliding window shorter than a sample, non-causal modules) goes to
sdpa unchanged, and so does a single sample with a mask (padding). Martlet picks it for training on a CPU
when no --attn_impl is given; it is never saved in a checkpoint's config.
"""

from __future__ import annotations

from typing import Any

from martlet.train import native
from martlet.train.kernels import shape_multiple

NAME = "martlet_varlen"
EAGER_MAX_LEN = 160  # below this many tokens plain matmul + softmax beats the CPU sdpa kernel (fwd + bwd, bf16)


def register() -> str:
    """Make NAME known to transformers (idempotent) and return it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def sample_lengths(position_ids: Any) -> list[int] | None:
    """Lengths of the samples laid end to end in a (1, T) row: a new sample wherever a position does not follow
    the one before. None when there is nothing to cut (no position ids, several rows, M-RoPE ids)."""
    import torch

    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    edges = [0, *starts, pos.shape[0]]
    return [b - a for a, b in zip(edges, edges[1:])]


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any):
    """query (1, H, T, D), key/value (1, KV, T, D) -> ((1, T, H, D), None), as transformers' attention functions."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = sample_lengths(kwargs.get("position_ids"))
    window = kwargs.get("sliding_window")
    unsupported = (dropout and module.training) or not getattr(module, "is_causal", True) or any(
        kwargs.get(k) is not None for k in ("softcap", "s_aux")) or kwargs.get("output_attentions")
    if (unsupported or lengths is None or (len(lengths) == 1 and attention_mask is not None) or query.shape[0] != 1
            or sum(lengths) != query.shape[2] or key.shape[2] != query.shape[2]
            or (window and max(lengths) > window)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # bf16 products on a CPU build a kernel for every new shape (~1-5 ms each, six shapes a sample): a sample runs
    # padded to a multiple of 16 tokens, so the shapes repeat (zero keys after the sample's end are masked anyway)
    multiple = shape_multiple(query.device.type, query.dtype, rows=16)
    outputs, start = [], 0
    for length in lengths:
        q, k, v = (t[0, :, start:start + length] for t in (query, key, value))  # (heads, L, D)
        start += length
        if length <= EAGER_MAX_LEN:
            padded = length + -length % multiple
            if padded > length:
                q, k, v = (F.pad(t, (0, 0, 0, padded - length)) for t in (q, k, v))
            # the query heads that share a key/value head form one matrix: no copies of k and v
            scores = q.reshape(kv_heads, groups * padded, dim) @ k.transpose(-1, -2)
            if native.usable(scores) is not None:  # scale, mask and softmax in one pass (train/native.py)
                probs = native.CausalSoftmax.apply(scores, scale)
            else:
                future = torch.ones(padded, padded, dtype=torch.bool, device=q.device).triu_(1).repeat(groups, 1)
                probs = (scores * scale).masked_fill(future, float("-inf")).softmax(-1, dtype=torch.float32)
                probs = probs.to(v.dtype)
            outputs.append((probs @ v).reshape(heads, padded, dim)[:, :length])
        else:
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                 enable_gqa=groups > 1)
            outputs.append(out[0])
    return torch.cat(outputs, dim=1).transpose(0, 1).unsqueeze(0).contiguous(), None
