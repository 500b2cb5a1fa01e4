"""Dataset evaluation: which rows, generating their replies in batches, results JSONL and metrics.

Each row's last assistant turn is its label; what comes before it is the prompt. Results are written
as they come (one JSON object per row: query, response, label, history, system), and the metrics of
the labelled rows are saved beside them. The held-out rows of a preference checkpoint (dpo, orpo, simpo,
cpo, kto) are its prompts with the preferred reply as the label (`reference_conversations`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from typing import Optional, Sequence

from martlet.args.infer import InferArguments
from martlet.args.rlhf import RLHFArguments
from martlet.args.sft import SftArguments
from martlet.custom import apply_custom_registrations
from martlet.data.preference import preference_train_val_rows, reference_conversations
from martlet.data.preprocess import train_val_rows
from martlet.errors import MartletError
from martlet.infer.checkpoint import Checkpoint
from martlet.infer.generation import GenConfig
from martlet.infer.metrics import compute_metrics
from martlet.infer.protocol import Engine, replies

logger = logging.getLogger("martlet")


def eval_rows(args: InferArguments, ckpt: Optional[Checkpoint]) -> list[dict]:
    """The rows to evaluate: the training run's held-out rows (--load_dataset_config), or --dataset's."""
    if args.load_dataset_config and not (args.dataset or args.val_dataset):
        if ckpt is None or not ckpt.sft_args:
            raise MartletError("this checkpoint has no sft_args.json, so its dataset is unknown.",
                               file=getattr(ckpt, "path", None), field="load_dataset_config",
                               hint="Pass the rows to evaluate with --dataset or --val_dataset.")
        val = held_out_rows(ckpt, args.val_dataset_sample)
        if not val:
            raise MartletError("the training run held out no validation rows (dataset_test_ratio 0 and no "
                               "val_dataset).", file=ckpt.path, field="load_dataset_config",
                               hint="Pass the rows to evaluate with --dataset or --val_dataset.")
        return val
    train, val = train_val_rows(args)
    if args.dataset and not args.val_dataset and args.dataset_test_ratio == 0:
        val = train[: args.val_dataset_sample] if args.val_dataset_sample else train
    return val


def held_out_rows(ckpt: Checkpoint, sample: Optional[int] = None) -> list[dict]:
    """The validation rows of the training run (the first `sample` of them, when given) as conversations.

    A preference run (its arguments name an rlhf_type) read preference rows: each becomes its prompt with the
    preferred reply as the label (see `reference_conversations`)."""
    preference = ckpt.sft_args.get("rlhf_type") is not None
    cls = RLHFArguments if preference else SftArguments
    known = {f.name for f in dataclasses.fields(cls)}
    saved = cls(**{k: v for k, v in ckpt.sft_args.items() if k in known})
    if sample is not None:  # counted in evaluated rows (a pair gives two KTO rows, evaluated as one)
        saved = dataclasses.replace(saved, val_dataset_sample=None)
    apply_custom_registrations(saved)  # the run's own registrations name its datasets
    if preference:
        val = reference_conversations(preference_train_val_rows(saved)[1])
    else:
        val = train_val_rows(saved)[1]
    return val[:sample] if sample is not None else val


@dataclasses.dataclass
class Request:
    messages: list  # the prompt: optional system turn, history, the query
    query: str
    history: list  # [[query, response], ...] before this query
    system: Optional[str]
    label: Optional[str]


def to_request(row: dict) -> Request:
    """A canonical row -> the prompt to generate from and the label (its last assistant turn)."""
    if "messages" not in row:
        raise MartletError("plain-text rows cannot be evaluated as a conversation.", file=row.get("where"),
                           field="text")
    messages = list(row["messages"])
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    label = turns[-1]["content"] if turns and turns[-1]["role"] == "assistant" else None
    prompt = turns[:-1] if label is not None else turns
    if not prompt or prompt[-1]["role"] != "user":
        raise MartletError("the row has no user turn to answer.", file=row.get("where"), field="messages")
    history, pending = [], None
    for turn in prompt[:-1]:
        if turn["role"] == "user":
            pending = turn["content"]
        elif pending is not None:
            history.append([pending, turn["content"]])
            pending = None
    head = [{"role": "system", "content": system}] if system is not None else []
    return Request(head + prompt, prompt[-1]["content"], history, system, label)


def result_path(args: InferArguments) -> str:
    """<result_dir or ckpt_dir/infer_result or output/infer_result>/<YYYYMMDD-HHMMSS>.jsonl (a new file)."""
    folder = args.result_dir or (os.path.join(args.ckpt_dir, "infer_result") if args.ckpt_dir
                                 else os.path.join("output", "infer_result"))
    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(folder, f"{stamp}.jsonl"), 1
    while os.path.exists(path):
        path, n = os.path.join(folder, f"{stamp}-{n}.jsonl"), n + 1
    return path


def metrics_path(results: str) -> str:
    return results[: -len(".jsonl")] + "_metrics.json"


def evaluate(engine: Engine, rows: Sequence[dict], config: Optional[GenConfig], *, batch_size: int, path: Optional[str] = None,
             verbose: bool = True) -> tuple[list[dict], dict]:
    """Generate a reply per row; write each result to `path` (JSONL) as it comes; return (results, metrics)."""
    requests = [to_request(row) for row in rows]
    chunk = batch_size * 4  # the engine sorts each chunk by length, so batches pad little
    results: list[dict] = []
    progress = None
    if not verbose:
        from tqdm import tqdm

        progress = tqdm(total=len(requests), desc="Inferring", unit="row")
    for start in range(0, len(requests), chunk):
        part = requests[start: start + chunk]
        texts = replies(engine, [r.messages for r in part], config)
        done = [{"query": r.query, "response": reply, "label": r.label, "history": r.history, "system": r.system}
                for r, reply in zip(part, texts)]
        if path:
            with open(path, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in done)
        if verbose:
            for d in done:
                print(f"[QUERY] {d['query']}\n[RESPONSE] {d['response']}\n[LABELS] {d['label']}\n" + "-" * 50,
                      flush=True)
        elif progress is not None:
            progress.update(len(done))
        results += done
    if progress is not None:
        progress.close()
    labelled = [d for d in results if d["label"] is not None]
    scores = compute_metrics([d["response"] for d in labelled], [d["label"] for d in labelled])
    metrics = {"rows": len(results), "labelled": scores.pop("count"), **scores}
    if path:
        with open(metrics_path(path), "w", encoding="utf-8") as fh:
            json.dump(metrics, fh, ensure_ascii=False, indent=2)
    return results, metrics
