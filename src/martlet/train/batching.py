"""How samples become batches: padding-free rows and packing.

Padding-free: the samples of a batch are laid end to end in one row, with position ids that restart at 0
for each sample and no attention mask. transformers then builds a block-diagonal causal mask from the
position ids (sdpa and eager, `masking_utils.find_packed_sequence_indices`) or runs flash-attn's varlen
kernel, so no token attends across a sample boundary and no compute is spent on padding. The first label
of every sample is ignored, so the last token of one sample is never trained to predict the next sample:
the loss is the same as on a padded batch.

Packing (`--packing true`): samples are grouped once, before training, into rows of at most `max_length`
tokens (first fit, longest first); each packed row is one item of the data set and a step sees
`batch_size` such rows. Steps then carry a steady number of tokens.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

IGNORE_INDEX = -100
# samples and sequences of a batch that begin alike (a chat template's system prompt, a pair's prompt, a GRPO group's)
# are computed once up to where they part, where the attention reads such rows (`varlen_attention.row_samples`);
# False: each whole (A/B measurements)
SHARE_PREFIXES = True


def prefix_trees(sequences: Sequence[Sequence[int]], limits: Sequence[int]) -> list[tuple[int, list[tuple[int, int]]]]:
    """Sequences grouped by how they begin, for a padding-free row that computes a shared beginning once:
    [(trunk, [(sequence, shared tokens), ...]), ...] in row order. A sequence shares with the earlier trunk it has
    the longest common beginning with, at most `limits[i]` tokens (it keeps at least one token of its own), and
    never as many as the sequence laid just before it in the row holds: its first position would then follow that
    sequence's last, and the two would read as one (`varlen_attention.row_samples`). Sharing nothing, it is a trunk."""
    trees: list[tuple[int, list[tuple[int, int]]]] = []
    for i, seq in enumerate(sequences):
        best, shared = None, 0
        for tree in trees:
            n = len(os.path.commonprefix([sequences[tree[0]], seq]))
            if n > shared:
                best, shared = tree, n
        if best is not None:
            shared = min(shared, limits[i], len(seq) - 1)
            before = best[1][-1][0] if best[1] else best[0]
            shared -= shared == len(sequences[before])
        if best is None or shared <= 0:
            trees.append((i, []))
        else:
            best[1].append((i, shared))
    return trees


class PaddingFreeCollator:
    """Lays a batch end to end in one row: input_ids, labels and position_ids of shape (1, total).

    `pad_to_multiple_of`: the row is made a multiple of that many tokens with one more "sample" of pad tokens
    (no labels, its own positions from 0, so nothing attends to it and it attends to nothing else): the loss and
    the gradients are those of the row without it. On a CPU the bf16 matrix products (oneDNN) build a kernel for
    each new matrix shape (`kernels.shape_multiple`); rows of every length meant 33-41 new kernels, 73-135 ms, at
    every step (measured); rows in steps of 64 tokens reuse a handful of shapes for a few percent more arithmetic.
    While every product runs on packed weights the trainer sets it to 1 (`pipeline.weights_packed_for`).

    `share_prefixes` (only where the attention is `martlet_varlen`, which reads such rows): samples that begin
    alike (a chat template's default system prompt) hold their shared beginning once (`prefix_trees`), as far as it
    has no labels: a sample's first labelled token is still predicted from its own tokens, so the loss is unchanged.
    """

    def __init__(self, pad_to_multiple_of: int = 0, pad_token_id: int = 0, share_prefixes: bool = False):
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.share_prefixes = share_prefixes

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        samples = []  # (ids, positions, labels)
        for f in features:
            ids = list(f["input_ids"])
            if ids:
                positions = list(f["position_ids"]) if f.get("position_ids") is not None else list(range(len(ids)))
                samples.append((ids, positions, list(f["labels"]) if f.get("labels") is not None else list(ids)))
        order: list[tuple[int, int]] = [(i, 0) for i in range(len(samples))]  # (sample, tokens shared with its trunk)
        if self.share_prefixes and not any(f.get("position_ids") is not None for f in features):  # (not packed)
            unlabelled = [next((t for t, y in enumerate(s[2]) if t > 0 and y != IGNORE_INDEX), len(s[0])) - 1
                          for s in samples]
            trees = prefix_trees([s[0] for s in samples], unlabelled)
            order = [member for trunk, branches in trees for member in [(trunk, 0), *branches]]
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i, shared in order:
            ids, positions, row_labels = (part[shared:] for part in samples[i])
            input_ids += ids
            position_ids += positions
            labels += [IGNORE_INDEX if p == 0 or p == shared else t for p, t in zip(positions, row_labels)]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        row = rounded_row(as_tensor(input_ids), as_tensor(position_ids), self.pad_to_multiple_of or 1,
                          as_tensor(labels), self.pad_token_id)
        return {"input_ids": row[0][None], "labels": row[2][None], "position_ids": row[1][None]}


def rounded_row(input_ids: Any, position_ids: Any, multiple: int, labels: Any = None, pad_token_id: int = 0):
    """A padding-free row (1-D tensors: ids, position ids, labels or None) made a multiple of `multiple` tokens with
    one more sample of pad tokens at its own positions from 0, labelled IGNORE_INDEX: nothing attends across into
    it, so the real tokens' results are unchanged, and the row's length repeats from step to step."""
    import torch

    missing = -input_ids.shape[0] % multiple
    if not missing:
        return input_ids, position_ids, labels
    filler = torch.arange(missing, device=input_ids.device)
    input_ids = torch.cat([input_ids, torch.full_like(filler, pad_token_id, dtype=input_ids.dtype)])
    if labels is not None:
        labels = torch.cat([labels, torch.full_like(filler, IGNORE_INDEX, dtype=labels.dtype)])
    return input_ids, torch.cat([position_ids, filler.to(position_ids.dtype)]), labels


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens: first fit over the rows, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return [sorted(b) for b in bins]


def pack_dataset(dataset: Any, capacity: int, seed: int = 0) -> Any:
    """A `datasets.Dataset` of packed rows (input_ids, labels, position_ids, length) from an encoded one."""
    import random

    import datasets

    lengths = list(dataset["length"])
    bins = pack_rows(lengths, capacity)
    random.Random(seed).shuffle(bins)  # longest-first packing would otherwise order the steps by length
    ids, labels = dataset["input_ids"], dataset["labels"]
    packed: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
    for members in bins:
        row_ids: list[int] = []
        row_labels: list[int] = []
        row_positions: list[int] = []
        for i in members:
            row_ids += ids[i]
            row_labels += labels[i]
            row_positions += range(len(ids[i]))
        packed["input_ids"].append(row_ids)
        packed["labels"].append(row_labels)
        packed["position_ids"].append(row_positions)
        packed["length"].append(len(row_ids))
    return datasets.Dataset.from_dict(packed)
