"""Attention for padding-free rows on a CPU: each sample attends on its own.

A padding-free row holds several samples end to end; their position ids restart at 0. transformers' sdpa path
turns that into one block-diagonal mask over the whole row, and torch's CPU attention kernels then compute
every block of the row x row square, masked or not. Here the row is cut at the restarts and each sample attends
to itself alone: the short samples in buckets of similar lengths (`_partition`), each sample padded to the longest
of its bucket, through two batched matrix products and one softmax a bucket and layer (for a few hundred tokens the
fastest on a CPU; a product pair per sample cost six products, three pads and three full-row gradient copies per
sample and layer), longer ones (over 160 tokens; 512 on bf16 with the native softmax) through sdpa with `is_causal`
(which skips the upper triangle). Same result as the mask, at a fraction of the work. Where Martlet's native
kernels run (x86 with AVX-512, or AVX2 for this pass alone) a row goes instead through one fused native pass a sample
and key/value head each way (`native.Attention`: no gathers, no padding, the causal triangle only), unless
`_fused` says the buckets do better for it.

Registered with transformers as the attention implementation "martlet_varlen" (the mask function is sdpa's,
so a padded batch or generation simply runs sdpa). Anything it does not handle (a batch of several rows,
attention dropout, soft-capping, sinks, a sliding window shorter than a sample, non-causal modules) goes to
sdpa unchanged, and so does a single sample with a mask (padding). Martlet picks it for training on a CPU
when no --attn_impl is given; it is never saved in a checkpoint's config.

Shared prefixes: a sample whose positions start at p > 0 (not at 0) continues the first p tokens of the last sample
before it that started at 0, its trunk: it attends to those and to itself, and the prefix's tokens sit in the row once
(SFT lays samples that begin alike after one copy of their system prompt, `batching.PaddingFreeCollator`; preference
training a pair's replies after one copy of their prompt, `rlhf_trainers`). sdpa's mask cannot say that, so such a
row never goes to sdpa: where this path cannot run it, it stops with an error (`reads_shared_prefixes` says where).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from martlet.train import native
from martlet.train.kernels import shape_multiple
from martlet.train.packed import compute_dtype
from martlet.utils import env_switch

NAME = "martlet_varlen"
EAGER_MAX_LEN = 160  # below this many tokens plain matmul + softmax beats the CPU sdpa kernel (fwd + bwd, bf16)
# with the native causal softmax on bf16 the buckets beat sdpa's CPU kernel far longer (one SmolLM2 layer's attention,
# fwd + bwd, one sample: 4.1x at 176 tokens, 3.3x at 320, 2.0x at 448, 1.55x at 640, 1.2x at 1,024, 0.72x at 2,048;
# in fp32 sdpa is as fast from 176 tokens on). Kept at 512: a bucket keeps its probabilities for the backward pass
# (heads x length² values a layer), sdpa none
NATIVE_BF16_MAX_LEN = 512
FUSED_MAX_LEN = 1024  # the fused native pass (below); 0.54x (bf16, AVX512-BF16 pairs) and 0.67x (fp32) sdpa at 2,048
FUSED_BF16_SHORT = 192  # on bf16, rows whose samples are all this short take the fused pass whatever their count
FUSED_TASKS_A_THREAD = 4  # else they need this many (sample, key/value head) tasks a thread


def register() -> str:
    """Make NAME known to transformers (idempotent) and return it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


class Sample(NamedTuple):
    start: int  # where its own tokens sit in the row
    length: int
    prefix_start: int = 0  # a shared prefix (the first tokens of its trunk) it attends to before its own tokens
    prefix: int = 0

    @property
    def size(self) -> int:  # the keys it attends to
        return self.prefix + self.length

    def keys(self) -> list[int]:
        own = range(self.start, self.start + self.length)
        return [*range(self.prefix_start, self.prefix_start + self.prefix), *own]


def row_samples(position_ids: Any) -> list[Sample] | None:
    """The samples laid end to end in a (1, T) row: a new sample wherever a position does not follow the one before.
    One that starts at position p > 0 continues the first p tokens of its trunk, the last sample before it that
    started at 0 (when there is one, at least p long). None when there is nothing to cut (no position ids, several
    rows, M-RoPE ids)."""
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    edges = [0, *starts, pos.shape[0]]
    firsts = pos[edges[:-1]].tolist()
    samples, trunk = [], None
    for a, b, first in zip(edges, edges[1:], firsts):
        if first == 0:
            trunk = a, b - a
        if first > 0 and trunk is not None and trunk[1] >= first:
            samples.append(Sample(a, b - a, trunk[0], first))
        else:
            samples.append(Sample(a, b - a))
    return samples


# (position ids, their version, their samples): every layer of a step asks; one tuple, replaced whole (threads)
_last_row: tuple[Any, int, Any] = (None, -1, None)


def _row_samples_once(position_ids: Any) -> tuple[Sample, ...] | None:
    """`row_samples`, computed once for the layers of a forward pass (they share one position ids tensor; the
    same tensor changed in place is read again)."""
    global _last_row
    ids, version, samples = _last_row
    if position_ids is not None and ids is position_ids and version == position_ids._version:
        return samples
    found = row_samples(position_ids)
    samples = None if found is None else tuple(found)
    _last_row = (position_ids, getattr(position_ids, "_version", -1), samples)
    return samples


def reads_shared_prefixes(config: Any, longest: int | None, training: bool = True) -> bool:
    """Whether a model of `config` runs every layer's attention of a row with shared prefixes through this path
    (which refuses what it cannot: attention dropout in training, soft-capping, a sliding window shorter than the
    `longest` sequence, None: unknown; and a multimodal model's position ids are its own)."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return (getattr(config, "_attn_implementation", None) == NAME and getattr(config, "attn_logit_softcapping", None)
            is None and not (window and (longest is None or longest > window))
            and not (training and getattr(config, "attention_dropout", 0))
            and getattr(config, "vision_config", None) is None)  # (multimodal position ids are not one row's)


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs: Any):
    """query (1, H, T, D), key/value (1, KV, T, D) -> ((1, T, H, D), None), as transformers' attention functions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    samples = _row_samples_once(kwargs.get("position_ids"))
    window = kwargs.get("sliding_window")
    unsupported = (dropout and module.training) or not getattr(module, "is_causal", True) or any(
        kwargs.get(k) is not None for k in ("softcap", "s_aux")) or kwargs.get("output_attentions")
    if (unsupported or samples is None or (len(samples) == 1 and attention_mask is not None) or query.shape[0] != 1
            or sum(s.length for s in samples) != query.shape[2] or key.shape[2] != query.shape[2]
            or (window and max(s.size for s in samples) > window)):
        if samples is not None and any(s.prefix for s in samples):
            raise RuntimeError("martlet_varlen: a row whose samples share prefixes needs its own attention path, and "
                               "this call cannot take it (attention dropout, soft-capping, sinks, a sliding window "
                               "shorter than a sample or a padded batch); sdpa would attend within each piece alone")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    heads, dim = query.shape[1], query.shape[3]
    scale = scaling if scaling is not None else dim ** -0.5
    dtype = _products_dtype(query, key, value)
    if _fused(query.device, dtype, dim, key.shape[1], samples):  # one native pass a sample and kv head each way
        q_rows, k_rows, v_rows = (t[0].transpose(0, 1).reshape(-1, dim).to(dtype) for t in (query, key, value))
        out = native.Attention.apply(q_rows, k_rows, v_rows, _sample_table(samples), heads, scale)
        return out.view(1, query.shape[2], heads, dim), None
    return _in_buckets(query, key, value, samples, scale), None


def _products_dtype(query: Any, key: Any, value: Any) -> Any:
    """The dtype the attention's products run in: autocast's where it is on (as its matrix products cast their
    inputs), else q's, k's and v's promoted to one. (Full training under bf16 autocast: fp32 weights make bf16 q, k
    and v, and the fp32 rotary angles make q and k fp32 again.)"""
    promoted = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return compute_dtype(query.device.type, promoted)


def _in_buckets(query: Any, key: Any, value: Any, samples: tuple[Sample, ...], scale: float) -> Any:
    """The short samples in buckets of batched products, the long ones through sdpa: (1, T, H, D)."""
    import torch.nn.functional as F

    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    groups = heads // kv_heads
    # bf16 products on a CPU build a kernel for every new shape (~1-5 ms each): short samples run padded to a
    # multiple of 16 tokens, so the shapes repeat
    multiple = shape_multiple(query.device.type, query.dtype, rows=16)
    layout = _layout(tuple(samples), heads, kv_heads, multiple, str(query.device), _bucket_max_len(query))
    rows = query.shape[2]
    # (T, heads, D) rows: a view where transformers' (1, heads, T, D) is a transposed (1, T, heads, D)
    q_rows, k_rows, v_rows = (t[0].transpose(0, 1).reshape(-1, dim) for t in (query, key, value))
    blocks = []
    for bucket in layout.buckets:
        # the samples of a bucket at once, each padded to the longest of them: one product of each kind a layer,
        # not six a sample. Padding rows repeat the sample's last token (finite values): causality hides them from
        # the sample's own queries, and their outputs are dropped, so their gradients are exactly zero. So are
        # those of a shared prefix's queries, computed again in each of its branches.
        count, padded = bucket.count, bucket.padded
        q = Gather.apply(q_rows, bucket.query_index, bucket.query_inverse, None)
        k = Gather.apply(k_rows, bucket.key_index, bucket.key_inverse, bucket.key_shared)
        v = Gather.apply(v_rows, bucket.key_index, bucket.key_inverse, bucket.key_shared)
        q = q.view(count * kv_heads, groups * padded, dim)
        k, v = k.view(count * kv_heads, padded, dim), v.view(count * kv_heads, padded, dim)
        scores = q @ k.transpose(-1, -2)  # the query heads that share a key/value head form one matrix
        if native.usable(scores) is not None:  # scale, mask and softmax in one pass (train/native.py)
            probs = native.CausalSoftmax.apply(scores, scale)
        else:
            future = torch.ones(padded, padded, dtype=torch.bool, device=q.device).triu_(1).repeat(groups, 1)
            probs = (scores * scale).masked_fill(future, float("-inf")).softmax(-1, dtype=torch.float32)
            probs = probs.to(v.dtype)
        blocks.append((probs @ v).view(-1, dim))  # rows ((sample * heads + head) * padded + position)
    for sample, keys in layout.long:  # sdpa's causal kernel skips the upper triangle
        if keys is None:
            q, k, v = (t[0, :, sample.start:sample.start + sample.length] for t in (query, key, value))
        else:  # a shared prefix, then the sample's own tokens: the prefix's outputs are dropped
            q, k, v = (t[0].index_select(1, keys) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                             enable_gqa=groups > 1)
        blocks.append(out[0, :, sample.prefix:].transpose(0, 1).reshape(-1, dim))  # rows (position * heads + head)
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return Gather.apply(out, layout.output_index, layout.output_inverse, None).view(1, rows, heads, dim)


def fused_row(position_ids: Any, length: int, dtype: torch.dtype, head_dim: int, kv_heads: int) -> Any | None:
    """The sample table (`native.Attention`'s `samples`) of a padding-free row of `length` tokens whose attention
    `varlen_attention` runs in the native fused pass (CPU rows, as `_fused` decides), else None. The caller checks
    what `reads_shared_prefixes` checks of the model."""
    samples = _row_samples_once(position_ids)
    if samples is None or sum(s.length for s in samples) != length:
        return None
    return _sample_table(samples) if _fused(torch.device("cpu"), dtype, head_dim, kv_heads, samples) else None


def _fused(device: torch.device, dtype: torch.dtype, head_dim: int, kv_heads: int, samples: tuple[Sample, ...]) -> bool:
    """Whether the native fused attention takes this row: on a CPU with the kernels, bf16 or fp32, a head size
    that is a multiple of 16, every sample at most FUSED_MAX_LEN keys (its buffers grow with the square). With
    AVX512-BF16 its bf16 products run on bf16 pairs and it takes every such row (6 SmolLM2 layers, fwd + bwd, against
    the buckets and sdpa: one sample of 128 tokens 1.76x, 256 1.76x, 512 1.07x, 1,024 1.31x; two of 500 1.66x; one
    of 2,048 0.54x, hence the limit). Without it, the products of bf16 rows run in fp32, at half the rate of the
    buckets' and sdpa's bf16 products on the whole square, and a row of few long samples stays with those: the pass
    runs a task a sample and key/value head, and with fewer than FUSED_TASKS_A_THREAD a thread they idle threads (30
    layers, one sample: 1.36x the buckets at 128 tokens, 0.82x at 256, 0.85x at 512; two of 500: 0.95x; four of 400:
    1.29x; every fp32 row up to 1,024 keys 1.5-3.9x)."""
    kernels = native.ops()
    if not (device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and head_dim % 16 == 0
            and env_switch("MARTLET_FUSED_ATTENTION") is not False and kernels is not None
            and not torch.compiler.is_compiling()):
        return False
    longest = max(s.size for s in samples)
    if longest > FUSED_MAX_LEN:
        return False
    tasks = len(samples) * kv_heads
    return (dtype == torch.float32 or kernels.bf16_dot() or longest <= FUSED_BF16_SHORT
            or tasks >= FUSED_TASKS_A_THREAD * torch.get_num_threads())


@functools.lru_cache(maxsize=8)  # the layers of one step share it
def _sample_table(samples: tuple[Sample, ...]) -> Any:
    return torch.tensor([[s.start, s.length, s.prefix_start, s.prefix] for s in samples], dtype=torch.long)


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
    key_shared: Any  # (rows, bucket rows) where a key row serves more samples of the bucket (a shared prefix), or None


class _Layout(NamedTuple):
    buckets: list[_Bucket]  # the short samples, in buckets of similar lengths
    long: list[tuple[Sample, Any]]  # the samples that run through sdpa one by one, each with its keys' tokens
    output_index: Any  # for each (token, head), its row in the outputs laid end to end
    output_inverse: Any  # for each output row, the (token, head) row it goes to (past the end: none, padding)


def _bucket_max_len(query: Any) -> int:
    """The longest sample that runs in a bucket, not through sdpa: longer on bf16 with the native causal softmax."""
    native_softmax = (query.dtype == torch.bfloat16 and query.device.type == "cpu" and native.ops() is not None
                      and not native.attention_only() and not torch.compiler.is_compiling())
    return NATIVE_BF16_MAX_LEN if native_softmax else EAGER_MAX_LEN


@functools.lru_cache(maxsize=8)  # the layers of one step share it
def _layout(samples: tuple[Sample, ...], heads: int, kv_heads: int, multiple: int, device: str,
            bucket_limit: int = EAGER_MAX_LEN) -> _Layout:
    tokens = sum(s.length for s in samples)
    short = sorted(((s, s.size) for s in samples if s.size <= bucket_limit), key=lambda sample: sample[1])
    long = [s for s in samples if s.size > bucket_limit]
    output_index = torch.empty(tokens, heads, dtype=torch.long)
    head = torch.arange(heads).view(1, heads)
    buckets, offset = [], 0
    for members in _partition(short, multiple):
        longest = members[-1][1]
        padded = longest + -longest % multiple
        slot = torch.arange(padded)  # each padded slot's token: the sample's own, its last one past its end
        keys = [torch.tensor(s.keys()) for s, _ in members]
        positions = torch.stack([k[slot.clamp(max=len(k) - 1)] for k in keys]).view(len(members), 1, padded)
        query_inverse, _ = _inverse(members, keys, tokens, heads, padded, own=True)
        for s, _ in members:  # a query's row in the bucket is its output's row in the bucket's block
            own = slice(s.start, s.start + s.length)
            output_index[own] = offset + query_inverse.view(tokens, heads)[own]
        key_inverse, key_shared = _inverse(members, keys, tokens, kv_heads, padded, own=False)
        indexes = ((positions * heads + torch.arange(heads).view(1, heads, 1)).flatten(),
                   (positions * kv_heads + torch.arange(kv_heads).view(1, kv_heads, 1)).flatten(),
                   query_inverse, key_inverse)
        shared = None if key_shared is None else tuple(t.to(device) for t in key_shared)
        buckets.append(_Bucket(len(members), padded, *(t.to(device) for t in indexes), shared))
        offset += len(members) * heads * padded
    for s in long:
        output_index[s.start:s.start + s.length] = offset + torch.arange(s.length).view(s.length, 1) * heads + head
        offset += s.length * heads
    output_index = output_index.flatten()
    output_inverse = torch.full((offset,), tokens * heads, dtype=torch.long)
    output_inverse[output_index] = torch.arange(tokens * heads)
    long_keys = [(s, torch.tensor(s.keys(), device=device) if s.prefix else None) for s in long]
    return _Layout(buckets, long_keys, output_index.to(device), output_inverse.to(device))


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


def _inverse(members: list[tuple[Sample, int]], keys: list[Any], tokens: int, width: int, padded: int,
             own: bool) -> tuple[Any, Any]:
    """For each of `tokens` x `width` rows, its row in a bucket's (sample, width, padded) block, one past the block
    for none: with `own`, the rows whose outputs a sample gives (its own tokens), else every row a sample reads (its
    keys, a shared prefix included). A row read by more samples of the bucket takes the first one's place; the
    others come back as (rows, bucket rows) to add, or None when there are none."""
    inverse = torch.full((tokens, width), len(members) * width * padded, dtype=torch.long)
    taken = torch.zeros(tokens, dtype=torch.bool)
    more = []
    lanes = torch.arange(width).view(1, width)
    for i, ((sample, size), key) in enumerate(zip(members, keys)):
        slots = torch.arange(sample.prefix if own else 0, size)
        rows, places = key[slots], (i * width + lanes) * padded + slots.view(-1, 1)
        again = taken[rows]
        if again.any():
            more.append(((rows[again].view(-1, 1) * width + lanes).flatten(), places[again].flatten()))
        fresh = ~again
        inverse[rows[fresh]] = places[fresh]
        taken[rows] = True
    shared = None if not more else (torch.cat([m[0] for m in more]), torch.cat([m[1] for m in more]))
    return inverse.flatten(), shared


class Gather(torch.autograd.Function):
    """rows.index_select(0, index), whose gradient is a gather too instead of index_select's scatter-add (13 ms a
    step of four ~80-token samples on SmolLM2): `inverse` gives, for each row of `rows`, the row of the result whose
    gradient it takes, one past the end for none (a zero row). A row gathered more than once (a sample's last token
    repeated into its padding) takes the gradient of its real place: the padding's is exactly zero (see above). A
    row that more samples really read (a shared prefix's keys) adds the others' gradients too: `shared`, (rows,
    result rows), or None. With the native kernels the gradient's gather is `gather_rows`: one parallel pass, without
    first copying the rows to append a zero row (7 us instead of 15-17 for a bucket's query rows on SmolLM2)."""

    @staticmethod
    def forward(ctx, rows, index, inverse, shared):
        ctx.save_for_backward(inverse)
        ctx.shared = shared
        return rows.index_select(0, index)  # as fast as `gather_rows` here (4.8 vs 5.2 us)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad.contiguous()
        kernels = native.usable(grad)
        if kernels is not None:
            out = kernels.gather_rows(grad, inverse)
        else:
            out = torch.cat([grad, grad.new_zeros(1, grad.shape[1])]).index_select(0, inverse)
        if ctx.shared is not None:
            rows, sources = ctx.shared
            out.index_add_(0, rows, grad.index_select(0, sources))
        return out, None, None, None
