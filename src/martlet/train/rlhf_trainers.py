"""The trainers behind `martlet rlhf`: trl's stable DPO and KTO trainers fed Martlet's tokenized data, and a
small Trainer for the reference-free losses (ORPO, SimPO, CPO; trl keeps those in `trl.experimental`).

All three log the same metrics (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected; logps are summed over the reply's tokens) and save whole checkpoints like SFT
(AtomicCheckpointMixin).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import logging
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
import trl
from transformers import Trainer, TrainingArguments
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import disable_dropout_in_model

from martlet import patches
from martlet.args.rlhf import RLHFArguments
from martlet.train import batching, rlhf_losses, varlen_attention
from martlet.train.batching import prefix_trees, rounded_row
from martlet.train.kernels import TokenScores, fused_disable_adapter, row_multiple
from martlet.train.loss import CHUNK, is_wrapped, lean_loss_supported, summed_cross_entropy, unwrap_causal_lm
from martlet.train.outputs import RunFiles
from martlet.train.packed import compute_dtype, computes_in
from martlet.train.trainer import AtomicCheckpointMixin
from martlet.utils import libraries_quietly

logger = logging.getLogger("martlet")


def _drop_ref_adapter(model: Any) -> None:
    """trl copies a PEFT model's adapter into a 'ref' adapter and uses that as the reference. Martlet's adapter
    is fresh, so the reference is simply the base model with the adapter switched off: no copy in memory, the
    same reference when a run resumes, and no extra 'ref/' adapter folder in every checkpoint."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


class PaddingFreeReference:
    """DPO and KTO: with `padding_free`, the policy's and the reference's passes run as one padding-free row
    (`padding_free_fused_forward`), and so does the reference pass of --precompute_ref_log_probs, which trl runs in
    its __init__ after fitting its fused LM head (`trl_padding_free_precompute`).

    The reference is frozen, so a row's reference log-probs are computed the first time the row is seen (trl's
    `compute_ref_log_probs`, for just the rows not seen yet) and read from `reference_cache` in every later epoch and
    evaluation, handed to trl as --precompute_ref_log_probs' columns (patch `trl_reference_cache`): from the second
    epoch on a step runs no reference forward, and the first costs what it did."""

    trl_class: Any = None
    paired = False  # DPO: row b and row b + B of a batch are one pair's chosen and rejected sequences
    reference_columns: tuple[str, ...] = ()  # the columns trl's loss reads with precompute_ref_logps

    def __init__(self, *args: Any, padding_free: bool = False, **kwargs: Any):
        self._martlet_padding_free = padding_free  # read by _precompute_ref_logps, inside trl's __init__
        super().__init__(*args, **kwargs)
        _drop_ref_adapter(self.model)
        if self.ref_model is None and hasattr(self.model, "peft_config"):  # trl's reference: the adapters off
            fused_disable_adapter(self.model)
        if padding_free:
            _padding_free(self.model, self.ref_model)
        sequences = [("input_ids", "attention_mask", "completion_mask")]
        if getattr(self, "calculate_KL", False):  # KTO's KL rows (fixed per row by `_prepare_dataset`)
            sequences.append(("KL_input_ids", "KL_attention_mask", "KL_completion_mask"))
        if not self.paired:  # KTO: a column for each sequence of a row (the reply, its KL row)
            self.reference_columns = self.reference_columns[:len(sequences)]
        self.reference_cache = ReferenceCache(tuple(sequences), self.paired, extra=() if self.paired else ("label",))

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        if self._martlet_padding_free and patches.usable("trl_padding_free_precompute", self.trl_class,
                                                          key=self.trl_class):
            _padding_free(self.model, self.ref_model)
        # (in trl's __init__, before training: its reference forward asks transformers deprecated questions)
        with libraries_quietly():
            return super()._precompute_ref_logps(dataset, name, batch_size)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            cache = self.reference_cache
            if cache.hits:
                logger.info(f"reference log-probs: {cache.misses} computed, {cache.hits} read back from earlier "
                            "epochs or evaluations (no reference forward for them)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (self.precompute_ref_logps or not self.reference_cache.reads(inputs)
                or not patches.usable("trl_reference_cache", self, key=type(self))):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        reference = self.ref_model or self.model  # as trl's precompute pass (LoRA: the adapter switched off)
        values = self.reference_cache.lookup(inputs, lambda rows: self._reference_log_probs(reference, rows))
        self.precompute_ref_logps = True  # trl's _compute_loss then reads the columns
        try:
            return super().compute_loss(model, {**inputs, **dict(zip(self.reference_columns, values))},
                                        return_outputs, num_items_in_batch)
        finally:
            self.precompute_ref_logps = False

    def _reference_log_probs(self, reference: Any, rows: dict[str, torch.Tensor]) -> Any:
        """trl's `compute_ref_log_probs` for these rows. KTO with KL rows: its reply rows and KL rows as one batch,
        so one forward computes both and a row's prompt runs once with its KL row's (patch `trl_kto_joint_reference`,
        whose guard compares the two ways on the first batch)."""
        if not getattr(self, "calculate_KL", False) or not patches.usable(
                "trl_kto_joint_reference", (self, reference, rows), key=type(self)):
            return self.compute_ref_log_probs(reference, rows)
        return self._joint_reference_log_probs(reference, rows)

    def _joint_reference_log_probs(self, reference: Any, rows: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        """KTO: (the replies', the KL rows') reference log-probs from one call of trl's `compute_ref_log_probs` on the
        reply rows and KL rows stacked, with trl's KL rows switched off for the call."""
        fields = ("input_ids", "attention_mask", "completion_mask")
        width = max(rows[name].shape[1] for name in ("input_ids", "KL_input_ids"))
        pad = getattr(self.processing_class, "pad_token_id", None) or 0

        def stacked(name: str) -> torch.Tensor:
            parts = [rows[name], rows["KL_" + name]]
            value = pad if name == "input_ids" else 0
            return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in parts])

        joint = {name: stacked(name) for name in fields}
        joint["label"] = rows["label"].repeat(2)
        self.calculate_KL = False
        try:
            values = self.compute_ref_log_probs(reference, joint)[0]
        finally:
            self.calculate_KL = True
        count = len(rows["input_ids"])
        return values[:count], values[count:]


class DPOTrainer(AtomicCheckpointMixin, PaddingFreeReference, trl.DPOTrainer):
    """trl's DPOTrainer on rows already tokenized by `martlet.data.preference` (prompt_ids, chosen_ids,
    rejected_ids), so the prompt is the SFT Template's and only the reply tokens count. With `padding_free`, the
    padded [chosen, rejected] batch runs as one padding-free row (`padding_free_fused_forward`), the reference pass
    too."""

    trl_class = trl.DPOTrainer
    paired = True
    reference_columns = ("ref_chosen_logps", "ref_rejected_logps")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # patch `trl_pretokenized_rows`
        patches.require("trl_pretokenized_rows", trl.DPOTrainer, key=trl.DPOTrainer)
        return dataset


class ReferenceCache:
    """Reference log-probs of the rows seen so far, keyed by a digest of each row's sequences (tokens and reply
    mask; 16 bytes a sequence), so the same row in another epoch, another batch or at another place in the batch
    finds its values. `paired`: a batch is [chosen..., rejected...] and a key covers a pair."""

    def __init__(self, sequences: tuple[tuple[str, str, str], ...], paired: bool, extra: tuple[str, ...] = ()):
        self.sequences, self.paired = sequences, paired
        self.fields = {name for names in sequences for name in names} | set(extra)
        self.values: dict[bytes, tuple[float, ...]] = {}
        self.dtype = torch.float32  # the reference log-probs' dtype, as computed
        self.hits = self.misses = 0

    def reads(self, batch: dict[str, Any]) -> bool:
        """Whether the batch holds these fields and nothing else (images, say, would need a part of the key)."""
        return set(batch) == self.fields

    def _keys(self, batch: dict[str, Any]) -> list[bytes]:
        digests = [hashlib.blake2b(digest_size=16) for _ in range(len(batch["input_ids"]))]
        for ids_name, mask_name, reply_name in self.sequences:
            keep = batch[mask_name].bool().cpu()
            ids, replies = batch[ids_name].cpu(), batch[reply_name].bool().cpu()
            for row, digest in enumerate(digests):
                digest.update(ids[row][keep[row]].numpy().tobytes())
                digest.update(replies[row][keep[row]].numpy().tobytes())
        keys = [digest.digest() for digest in digests]
        half = len(keys) // 2
        return [chosen + rejected for chosen, rejected in zip(keys[:half], keys[half:])] if self.paired else keys

    def lookup(self, batch: dict[str, Any], compute: Any) -> list[torch.Tensor]:
        """The batch's reference log-probs, one tensor for each value `compute(rows)` returns (DPO: chosen,
        rejected; KTO: the replies', the KL rows'); `compute` runs once, on the rows not seen yet."""
        keys = self._keys(batch)
        missing = [i for i, key in enumerate(keys) if key not in self.values]
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        if missing:
            rows = missing + [len(keys) + i for i in missing] if self.paired else missing
            index = torch.tensor(rows, device=batch["input_ids"].device)
            computed = [v for v in compute({k: v.index_select(0, index) for k, v in batch.items()}) if v is not None]
            self.dtype = computed[0].dtype
            for i, values in zip(missing, zip(*(v.tolist() for v in computed))):
                self.values[keys[i]] = values
        found = torch.tensor([self.values[key] for key in keys], dtype=self.dtype, device=batch["input_ids"].device)
        return list(found.unbind(1))


def _padding_free(*models: Any) -> None:
    for model in models:
        if model is not None:
            padding_free_fused_forward(model.get_base_model() if hasattr(model, "get_base_model") else model)


def _row_layout(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch as one padding-free row: which tokens are real, their position ids (restarting per
    sequence), and where each real token sits in the row."""
    keep = attention_mask.bool()
    positions = (keep.long().cumsum(1) - 1)[keep]
    return keep, positions, keep.flatten().cumsum(0).view(keep.shape) - 1


def _sequences_row(input_ids: torch.Tensor, attention_mask: torch.Tensor, share: bool):
    """A padded batch's real tokens as one padding-free row -> (ids, position ids, slot): slot[b, t] is where token t
    of sequence b is computed (-1 for padding). With `share`, a sequence that begins like an earlier tree's first
    sequence (its trunk) continues that tree (`batching.prefix_trees`): only its tokens after the shared beginning
    enter the row, right after the tree's other sequences, at their own positions, which `varlen_attention` reads as
    "attends to the trunk's first tokens, then to its own"."""
    keep = attention_mask.bool()
    seqs = [ids[k].tolist() for ids, k in zip(input_ids, keep)] if share else []
    trees = prefix_trees(seqs, [len(seq) - 1 for seq in seqs])
    if not any(branches for _, branches in trees):  # nothing shared: every sequence whole, in order
        keep, positions, row_index = _row_layout(attention_mask)
        return input_ids[keep], positions, row_index.masked_fill(~keep, -1)
    slot = torch.full(keep.shape, -1, dtype=torch.long, device=input_ids.device)
    pieces, positions, start = [], [], 0
    for trunk, branches in trees:
        trunk_tokens = keep[trunk].nonzero().flatten()
        for b, shared in [(trunk, 0), *branches]:
            where = keep[b].nonzero().flatten()
            n = len(seqs[b]) - shared
            slot[b, where[:shared]] = slot[trunk, trunk_tokens[:shared]]
            slot[b, where[shared:]] = torch.arange(start, start + n, device=slot.device)
            pieces.append(input_ids[b, where[shared:]])
            positions.append(torch.arange(shared, shared + n, device=slot.device))
            start += n
    return torch.cat(pieces), torch.cat(positions), slot


def _row_multiple(model: Any, device_type: str) -> int:
    """What to round a padding-free row's length up to (`kernels.row_multiple`, for the activations' dtype)."""
    return row_multiple(model, device_type, compute_dtype(device_type, model.dtype))


# True while Martlet's padding-free forward runs trl's fused head: score only the labelled positions
_compact_scoring: contextvars.ContextVar[bool] = contextvars.ContextVar("martlet_compact_scoring", default=False)


def _use_triton_dispatcher(original: Any) -> Any:
    """What `trl.trainer.utils._use_triton` becomes (once, `patches.patch_global`): True inside the padding-free
    forward, where trl then scores only the labelled positions (its path for Triton devices); elsewhere trl's answer."""

    def _use_triton(device):
        return True if _compact_scoring.get() else original(device)

    return _use_triton


def padding_free_fused_forward(model: Any, temperature: float = 1.0) -> None:
    """Make trl's fused-LM-head forward (`model(..., labels=, fused_lm_head=True)`, trl 1.16) run a padded batch as
    one padding-free row, and hand its per-token fields back in the padded layout.

    trl pads each pair's chosen and rejected sequences to the longest of the batch, and on devices without Triton
    scores every position through the LM head, padding and prompts included. Here the real tokens are laid end to
    end with position ids restarting per sequence (the attention never crosses sequences: transformers' packed
    sequence masks, or `martlet_varlen` on a CPU), each sequence's first token is never a target, and only the
    labelled positions are scored. The log-probs, entropies and other per-token fields come back where trl expects
    them, zero elsewhere, so its DPO losses and metrics are unchanged (tested against the padded forward). Two
    patches of `martlet.patches` (`trl_compact_scoring`, `trl_padding_free_forward`): where a guard finds trl
    changed, the padded forward runs. `temperature`: what trl's head divides the logits by (GRPO's sampling
    temperature), for Martlet's own scoring (`trl_token_scores`).
    """
    import trl.trainer.utils as trl_utils

    model._martlet_score_temperature = temperature
    if getattr(model.forward, "__func__", None) is _padding_free_forward:
        return  # done already (before and after trl's __init__)
    if patches.patch_global("trl_compact_scoring", trl_utils, "_use_triton", _use_triton_dispatcher):
        patches.patch_forward("trl_padding_free_forward", model, _padding_free_forward)


def _padding_free_forward(self, *args: Any, fused_lm_head: bool = False, labels: Any = None, input_ids: Any = None,
                          attention_mask: Any = None, **kwargs: Any):
    fused = self._plain_forward
    if (args or not fused_lm_head or labels is None or input_ids is None or attention_mask is None
            or input_ids.shape[0] < 2 or any(torch.is_tensor(v) for v in kwargs.values())):
        return fused(*args, fused_lm_head=fused_lm_head, labels=labels, input_ids=input_ids,
                     attention_mask=attention_mask, **kwargs)
    if _scores_itself(self, kwargs):
        return _scored_sequences(self, input_ids, attention_mask, labels)
    keep, positions, row_index = _row_layout(attention_mask)
    row_labels = labels[keep].masked_fill(positions == 0, -100)  # never predicted from the sequence before
    row = rounded_row(input_ids[keep], positions, _row_multiple(self, input_ids.device.type), row_labels)
    token = _compact_scoring.set(True)
    try:
        out = fused(input_ids=row[0][None], position_ids=row[1][None], labels=row[2][None], fused_lm_head=True,
                    **kwargs)
    finally:
        _compact_scoring.reset(token)
    # padded position (b, t) predicts token (b, t + 1), whose prediction in the row sits just before it
    source, valid = (row_index[:, 1:] - 1).clamp(min=0), keep[:, 1:]
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask"):
        value = getattr(out, name, None)
        if value is not None:
            out[name] = value[0][source].masked_fill(~valid, 0)
    return out


def _decoded_row(lm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states for a padded batch's real tokens run as one padding-free row (shared
    beginnings once, where the attention reads them: `batching.SHARE_PREFIXES`; rounded up as `_row_multiple` says),
    and each token's row there."""
    longest = int(attention_mask.sum(1).max())
    share = batching.SHARE_PREFIXES and varlen_attention.reads_shared_prefixes(lm.config, longest, lm.training)
    ids, positions, slot = _sequences_row(input_ids, attention_mask, share)
    ids, positions, _ = rounded_row(ids, positions, _row_multiple(lm, input_ids.device.type))
    hidden = lm.get_decoder()(input_ids=ids[None], position_ids=positions[None], use_cache=False).last_hidden_state
    return hidden[0], slot


def _predicted(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, T - 1): whether token t + 1 of each padded sequence is scored, from the token before it (labelled, not
    a sequence's first)."""
    keep = attention_mask.bool()
    return keep[:, 1:] & keep[:, :-1] & (labels[:, 1:] != -100)


def _scored_sequences(lm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
    """trl's fused-head fields for a padded batch, computed by Martlet (`_decoded_row`, then `TokenScores` on the
    labelled positions alone), in the padded layout: field (b, t) is the prediction of token t + 1, zero where
    unlabelled; `loss` the mean negative log-probability (trl's NLL term, RPO's "sft" loss)."""
    import trl.trainer.utils as trl_utils

    hidden, slot = _decoded_row(lm, input_ids, attention_mask)
    scored = _predicted(attention_mask, labels)
    fields = _token_fields(lm, hidden[slot[:, :-1][scored]], labels[:, 1:][scored])
    logp, entropy, mean_logits, top1 = (torch.zeros(scored.shape, dtype=v.dtype, device=v.device)
                                        .masked_scatter(scored, v) for v in fields)
    loss = -fields[0].sum() / scored.sum().clamp(min=1)
    return trl_utils.FusedCausalLMOutput(loss=loss, log_probs=logp, entropy=entropy, mean_logits=mean_logits,
                                         is_top1=top1, label_mask=scored)


def _token_fields(lm: Any, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Log-probability of each target, entropy, mean logit and top-1 from the hidden states that predict them."""
    return TokenScores.apply(hidden, lm.get_output_embeddings().weight, targets, CHUNK,
                             getattr(lm, "_martlet_score_temperature", 1.0))


# what trl's fused forward is called with in DPO, KTO and GRPO (trl 1.16); anything else (pre-shifted
# `shift_labels` under context parallelism, a request for hidden states) goes to trl's own fused head
_PLAIN_CALL = frozenset({"inputs_embeds", "output_attentions", "output_hidden_states", "use_cache", "return_dict"})


def _scores_itself(lm: Any, kwargs: dict[str, Any]) -> bool:
    """Whether `_scored_row` can stand in for trl's fused head here: a plain call, the head a frozen projection
    without bias (LoRA), a CPU (a GPU keeps trl's Triton head), and the guard of `trl_token_scores` passed for this
    model and temperature (the same fields, the same values). With or without the native kernels: without them
    `TokenScores` runs the torch operations trl's head runs, on the labelled positions alone, after a row that holds
    a pair's shared prompt once (DPO on an emulated AVX2 CPU, fp32: 1.29-1.43x a step)."""
    import trl.trainer.utils as trl_utils

    if any(key not in _PLAIN_CALL or (value not in (None, False) and key != "return_dict")
           for key, value in kwargs.items()):
        return False
    if not lean_loss_supported(lm) or getattr(trl_utils, "FusedCausalLMOutput", None) is None:
        return False
    if lm.device.type != "cpu":
        return False
    head = lm.get_output_embeddings()
    # (and the head's product in its weight's dtype: full training's fp32 reference copy under bf16 autocast runs it in
    # bf16 in trl's head, in fp32 in `TokenScores`: not the same values, so trl's head scores it, without the guard)
    if not _frozen_plain_head(head) or not computes_in(head.weight, head.weight.dtype):
        return False
    temperature = getattr(lm, "_martlet_score_temperature", 1.0)
    verdict = getattr(lm, "_martlet_token_scores", None)  # (temperature, usable): the guard runs once a model
    if verdict is None or verdict[0] != temperature:
        verdict = temperature, patches.usable("trl_token_scores", (lm, head_fields_side_by_side), remember=False)
        lm._martlet_token_scores = verdict
    return verdict[1]


def _frozen_plain_head(head: Any) -> bool:
    """An LM head `TokenScores` can score through: a projection without bias whose weight trains not (LoRA)."""
    return getattr(head, "bias", None) is None and not head.weight.requires_grad


def head_fields_side_by_side(lm: Any) -> tuple[Any, Any]:
    """trl's fused-head output (compact, as in training) and `_scored_row`'s for one tiny row of `lm`, prompt tokens
    unlabelled: what the guard of patch `trl_token_scores` compares."""
    ids = torch.randint(1, lm.get_output_embeddings().weight.shape[0], (8,), generator=torch.Generator().manual_seed(0))
    ids = ids.to(lm.get_output_embeddings().weight.device)
    positions = torch.arange(8, device=ids.device)
    labels = ids.clone()
    labels[:3] = -100
    token = _compact_scoring.set(True)
    try:
        want = lm._plain_forward(input_ids=ids[None], position_ids=positions[None], labels=labels[None],
                                 fused_lm_head=True)
    finally:
        _compact_scoring.reset(token)
    return want, _scored_row(lm, ids, positions, labels)


def _scored_row(lm: Any, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> Any:
    """trl's fused-head fields for one padding-free row, computed by Martlet: the decoder, then `TokenScores` on
    the labelled positions alone (one native pass over each chunk of logits on a CPU, none kept for backward).
    Field j is the prediction of token j + 1 (one fewer than the row's tokens, as trl's); zero where unlabelled.
    `loss` is the mean negative log-probability (trl's NLL term, RPO's "sft" loss)."""
    import trl.trainer.utils as trl_utils

    hidden = lm.get_decoder()(input_ids=ids[None], position_ids=positions[None], use_cache=False).last_hidden_state[0]
    target = labels[1:]
    mask = target != -100
    logp, entropy, mean_logits, top1 = _token_fields(lm, hidden[:-1][mask], target[mask])

    def spread(value):
        return torch.zeros(target.shape, dtype=value.dtype, device=value.device).masked_scatter(mask, value)[None]

    loss = -logp.sum() / mask.sum().clamp(min=1)
    return trl_utils.FusedCausalLMOutput(loss=loss, log_probs=spread(logp), entropy=spread(entropy),
                                         mean_logits=spread(mean_logits), is_top1=spread(top1), label_mask=mask[None])


class KTOTrainer(AtomicCheckpointMixin, PaddingFreeReference, trl.KTOTrainer):
    """trl's KTOTrainer on rows tokenized by `martlet.data.preference` (prompt_ids, completion_ids, label); padding-free
    like DPOTrainer."""

    trl_class = trl.KTOTrainer
    reference_columns = ("ref_logps", "ref_KL_logps")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # patch `trl_pretokenized_rows`
        patches.require("trl_pretokenized_rows", trl.KTOTrainer, key=trl.KTOTrainer)
        if not self.calculate_KL:
            return dataset

        def add_kl(batch):  # trl's rule: each row's KL reply is its neighbour's, within a training batch
            batch["KL_completion_ids"] = batch["completion_ids"][-1:] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's completion tokens, and how many there are."""
    ids, mask = batch["input_ids"], batch["completion_mask"].bool()
    start = max(1, int(mask.float().argmax(dim=1).min()))  # the earliest reply token in the batch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    extra = {"logits_to_keep": ids.shape[1] - start + 1} if _takes_logits_to_keep(type(base)) else {}
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False, **extra).logits
    logits = logits[:, -(ids.shape[1] - start + 1):-1].float()  # the positions that predict tokens start..end
    labels, mask = ids[:, start:], mask[:, start:]
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def padding_free_sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` on one padding-free row: the decoder sees only real tokens, and only reply tokens go through
    the LM head, chunked, the gradient made on the way: all sequences at once through `TokenScores` when the head
    is frozen (LoRA), else one at a time through the lean loss's cross-entropy (which gives the head its gradient)."""
    ids, reply = batch["input_ids"], batch["completion_mask"].bool()
    lm = unwrap_causal_lm(model)
    hidden, slot = _decoded_row(lm, ids, batch["attention_mask"])
    scored = _predicted(batch["attention_mask"], torch.where(reply, ids, -100))  # token t + 1 from token t
    head = lm.get_output_embeddings()
    if _frozen_plain_head(head):  # (LoRA): all at once
        sequence, token = scored.nonzero(as_tuple=True)
        logp = TokenScores.apply(hidden[slot[sequence, token]], head.weight, ids[sequence, token + 1], CHUNK)[0]
        return torch.zeros(len(ids), dtype=logp.dtype, device=logp.device).index_add(0, sequence, logp), scored.sum(-1)
    logps = [-summed_cross_entropy(hidden[slot[b, t]], ids[b, t + 1], head)
             for b, t in enumerate(row.nonzero().flatten() for row in scored)]
    return torch.stack(logps), scored.sum(-1)


class RefFreeTrainer(AtomicCheckpointMixin, Trainer):
    """ORPO, SimPO and CPO: a loss of the policy's own log-probs of the chosen and rejected replies (padding-free
    and scoring reply tokens only when `padding_free`, unless the model is wrapped for distributed training)."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(self, *args: Any, loss_fn: Any, padding_free: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.padding_free = padding_free and lean_loss_supported(self.model)
        disable_dropout_in_model(self.model)  # as trl's trainers do: the loss compares deterministic log-probs
        self.loss_fn = loss_fn
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lean = self.padding_free and not is_wrapped(model)
        logps, tokens = (padding_free_sequence_logps if lean else sequence_logps)(model, inputs)
        (chosen, rejected), (n_chosen, n_rejected) = logps.chunk(2), tokens.chunk(2)  # the batch is [chosen, rejected]
        loss, chosen_rewards, rejected_rewards, extras = self.loss_fn(chosen, rejected, n_chosen, n_rejected)
        metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(), **extras}
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        super().log(logs, start_time)


def build_trainer(args: RLHFArguments, model: Any, ref_model: Any, tokenizer: Any, train_set: Any, val_set: Any,
                  training_kwargs: dict[str, Any], callbacks: list[Any], run_files: RunFiles | None = None):
    """The trainer for `args.rlhf_type`, configured from the SFT training keywords plus the preference ones;
    `run_files` go into every checkpoint."""
    common = dict(model=model, train_dataset=train_set, eval_dataset=val_set, processing_class=tokenizer,
                  callbacks=callbacks, run_files=run_files)
    kind, beta, loss_type = args.rlhf_type, args.effective_beta(), args.effective_loss_type()
    reference = dict(beta=beta, max_length=None, precompute_ref_log_probs=args.precompute_ref_log_probs)
    if kind == "dpo":
        losses, weights = [loss_type], [1.0]
        if args.rpo_alpha:  # RPO: DPO plus rpo_alpha times the NLL of the chosen replies (trl's "sft" loss)
            losses, weights = losses + ["sft"], weights + [args.rpo_alpha]
        config = trl.DPOConfig(**training_kwargs, loss_type=losses, loss_weights=weights, **reference)
        return DPOTrainer(ref_model=ref_model, args=config, padding_free=args.effective_padding_free(), **common)
    if kind == "kto":
        config = trl.KTOConfig(**training_kwargs, loss_type=loss_type, desirable_weight=args.desirable_weight,
                               undesirable_weight=args.undesirable_weight, **reference)
        return KTOTrainer(ref_model=ref_model, args=config, padding_free=args.effective_padding_free(), **common)
    loss_fn = {
        "orpo": functools.partial(rlhf_losses.orpo_loss, beta=beta),
        "simpo": functools.partial(rlhf_losses.simpo_loss, beta=beta, gamma=args.simpo_gamma,
                                   alpha=args.effective_cpo_alpha()),
        "cpo": functools.partial(rlhf_losses.cpo_loss, beta=beta, alpha=args.effective_cpo_alpha(),
                                 loss_type=loss_type),
    }[kind]
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    return RefFreeTrainer(args=TrainingArguments(**training_kwargs), data_collator=collator, loss_fn=loss_fn,
                          padding_free=args.effective_padding_free(), **common)
