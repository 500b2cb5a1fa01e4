"""Attention for padding-free rows on a CPU: each sample attends on its own.

A padding-free row holds several samples end to end; their position ids restart at 0. transformers' sdpa path
turns that into one block-diagonal mask over the whole row, and torch's CPU attention kernels then compute
every block of the row x row square, masked or not. Here the row is cut at the restarts and each sample attends
to itself alone: the short samples in buckets of similar lengths (`_partition`), each sample padded to the longest
of its bucket, through two batched matrix products and one softmax a bucket and layer (for a few hundred tokens the
fastest on a CPU; a product pair per sample cost six products, three pads and three full-row gradient copies per
sample and layer), longer ones through sdpa with `is_causal` (which skips the upper triangle). Same result as the
mask, at a fraction of the work.

Registered with transformers as the attention implementation "martlet_varlen" (the mask function is sdpa's,
so a padded batch or generation simply runs sdpa). Anything it does not handle (a batch of several rows,
attention dropout, soft-capping, sinks, a sliding window shorter than a sample, non-causal modules) goes to
sdpa unchanged, and so does a single sample with a mask (padding). Martlet picks it for training on a CPU
when no --attn_impl is given; it is never saved in a checkpoint's config.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

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
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    edges = [0, *starts, pos.shape[0]]
    return [b - a for a, b in zip(edges, edges[1:])]


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any):
    """query (1, H, T, D), key/value (1, KV, T, D) -> ((1, T, H, D), None), as transformers' attention functions."""
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
    # bf16 products on a CPU build a kernel for every new shape (~1-5 ms each): short samples run padded to a
    # multiple of 16 tokens, so the shapes repeat
    multiple = shape_multiple(query.device.type, query.dtype, rows=16)
    layout = _layout(tuple(lengths), heads, kv_heads, multiple, str(query.device))
    rows = query.shape[2]
    # (T, heads, D) rows: a view where transformers' (1, heads, T, D) is a transposed (1, T, heads, D)
    q_rows, k_rows, v_rows = (t[0].transpose(0, 1).reshape(-1, dim) for t in (query, key, value))
    blocks = []
    for bucket in layout.buckets:
        # the samples of a bucket at once, each padded to the longest of them: one product of each kind a layer,
        # not six a sample. Padding rows repeat the sample's last token (finite values): causality hides them from
        # the sample's own queries, and their outputs are dropped, so their gradients are exactly zero.
        count, padded = bucket.count, bucket.padded
        q = Gather.apply(q_rows, bucket.query_index, bucket.query_inverse).view(count * kv_heads, groups * padded, dim)
        k = Gather.apply(k_rows, bucket.key_index, bucket.key_inverse).view(count * kv_heads, padded, dim)
        v = Gather.apply(v_rows, bucket.key_index, bucket.key_inverse).view(count * kv_heads, padded, dim)
        scores = q @ k.transpose(-1, -2)  # the query heads that share a key/value head form one matrix
        if native.usable(scores) is not None:  # scale, mask and softmax in one pass (train/native.py)
            probs = native.CausalSoftmax.apply(scores, scale)
        else:
            future = torch.ones(padded, padded, dtype=torch.bool, device=q.device).triu_(1).repeat(groups, 1)
            probs = (scores * scale).masked_fill(future, float("-inf")).softmax(-1, dtype=torch.float32)
            probs = probs.to(v.dtype)
        blocks.append((probs @ v).view(-1, dim))  # rows ((sample * heads + head) * padded + position)
    for start, length in layout.long:  # sdpa's causal kernel skips the upper triangle
        q, k, v = (t[0, :, start:start + length] for t in (query, key, value))
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                             enable_gqa=groups > 1)
        blocks.append(out[0].transpose(0, 1).reshape(-1, dim))  # rows (position * heads + head)
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return Gather.apply(out, layout.output_index, layout.output_inverse).view(1, rows, heads, dim), None


# A bucket of short samples costs its products' and softmax's calls (~150 us a layer on SmolLM2 here), about the
# work of padding one more sample to 96 tokens: a bucket is worth it when it saves more than this many slots
# (padded length squared, summed over its samples)
BUCKET_COST = 96 * 96


class _Bucket(NamedTuple):
    count: int  # samples
    padded: int  # the length each runs at
    query_index: Any  # rows of the (T * heads, D) query rows that make the bucket's queries; keys and values
    key_index: Any
    query_inverse: Any  # for each query row, its row in the bucket (past the end: none); keys and values
    key_inverse: Any


class _Layout(NamedTuple):
    buckets: list[_Bucket]  # the short samples, in buckets of similar lengths
    long: list[tuple[int, int]]  # (start, length) of the samples that run through sdpa one by one
    output_index: Any  # for each (token, head), its row in the outputs laid end to end
    output_inverse: Any  # for each output row, the (token, head) row it goes to (past the end: none, padding)


@functools.lru_cache(maxsize=8)  # the layers of one step share it
def _layout(lengths: tuple[int, ...], heads: int, kv_heads: int, multiple: int, device: str) -> _Layout:
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    tokens = sum(lengths)
    short = sorted(((s, n) for s, n in zip(starts, lengths) if n <= EAGER_MAX_LEN), key=lambda sample: sample[1])
    long = [(s, n) for s, n in zip(starts, lengths) if n > EAGER_MAX_LEN]
    output_index = torch.empty(tokens, heads, dtype=torch.long)
    head = torch.arange(heads).view(1, heads)
    buckets, offset = [], 0
    for members in _partition(short, multiple):
        longest = members[-1][1]
        padded = longest + -longest % multiple
        slot = torch.arange(padded)  # each padded slot's token: the sample's own, its last one past its end
        positions = torch.stack([s + slot.clamp(max=n - 1) for s, n in members]).view(len(members), 1, padded)
        query_inverse = _inverse(members, tokens, heads, padded)
        for s, n in members:  # a query's row in the bucket is its output's row in the bucket's block
            output_index[s:s + n] = offset + query_inverse.view(tokens, heads)[s:s + n]
        indexes = ((positions * heads + torch.arange(heads).view(1, heads, 1)).flatten(),
                   (positions * kv_heads + torch.arange(kv_heads).view(1, kv_heads, 1)).flatten(),
                   query_inverse, _inverse(members, tokens, kv_heads, padded))
        buckets.append(_Bucket(len(members), padded, *(t.to(device) for t in indexes)))
        offset += len(members) * heads * padded
    for s, n in long:
        output_index[s:s + n] = offset + torch.arange(n).view(n, 1) * heads + head
        offset += n * heads
    output_index = output_index.flatten()
    output_inverse = torch.full((offset,), tokens * heads, dtype=torch.long)
    output_inverse[output_index] = torch.arange(tokens * heads)
    return _Layout(buckets, long, output_index.to(device), output_inverse.to(device))


def _partition(samples: list[tuple[int, int]], multiple: int) -> list[list[tuple[int, int]]]:
    """Samples sorted by length, cut into buckets of neighbours: the fewest padded slots (each bucket's padded
    length squared, times its samples) plus BUCKET_COST a bucket (dynamic programming over the cut points)."""
    padded = [n + -n % multiple for _, n in samples]
    best, cut = [0] + [None] * len(samples), [0] * (len(samples) + 1)
    for j in range(1, len(samples) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * padded[j - 1] ** 2 + BUCKET_COST
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], len(samples)
    while j:
        buckets.append(samples[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def _inverse(members: list[tuple[int, int]], tokens: int, width: int, padded: int) -> Any:
    """For each of `tokens` x `width` rows, its row in a bucket's (sample, width, padded) block; one past the block
    for tokens of other samples."""
    inverse = torch.full((tokens, width), len(members) * width * padded, dtype=torch.long)
    for i, (s, n) in enumerate(members):
        inverse[s:s + n] = (i * width + torch.arange(width).view(1, width)) * padded + torch.arange(n).view(n, 1)
    return inverse.flatten()


class Gather(torch.autograd.Function):
    """rows.index_select(0, index), whose gradient is a gather too instead of index_select's scatter-add (13 ms a
    step of four ~80-token samples on SmolLM2): `inverse` gives, for each row of `rows`, the row of the result whose
    gradient it takes, one past the end for none (a zero row). A row gathered more than once (a sample's last token
    repeated into its padding) takes the gradient of its real place: the padding's is exactly zero (see above).
    With the native kernels the gradient's gather is `gather_rows`: one parallel pass, without first copying the
    rows to append a zero row (7 us instead of 15-17 for a bucket's query rows on SmolLM2)."""

    @staticmethod
    def forward(ctx, rows, index, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)  # as fast as `gather_rows` here (4.8 vs 5.2 us)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad.contiguous()
        kernels = native.usable(grad)
        if kernels is not None:
            return kernels.gather_rows(grad, inverse), None, None
        return torch.cat([grad, grad.new_zeros(1, grad.shape[1])]).index_select(0, inverse), None, None
