"""Training throughput and memory: a plain transformers Trainer + peft baseline against Martlet's defaults,
side by side in one invocation, on the embedded SmolLM2 and the built-in data.

    HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py [--steps 16] [--what sft,dpo,kto,orpo,simpo,cpo|both|all]
                                                         [--rounds 3]
                                                         [--lora_dropout 0.05] [--cpu_isa avx2|avx512] [--epochs 2]
                                                         [--baseline plain|martlet-torch|martlet-unpacked|
                                                                     martlet-unshared|martlet-buckets|
                                                                     martlet-glibc]

It first prints the CPU features found, the kernel path taken and this host's matrix-product speed in the
training dtype; after each table, Martlet's share of the roofline (that speed over the matrix-product FLOP a
token costs: `flop_per_token`), and by issue #23's measure (`issue_measure`). `--cpu_isa avx2` runs both sides as on an AVX2 laptop, `--cpu_isa avx512` as on an
AVX-512 Xeon without BF16; `--baseline martlet-torch` compares Martlet with its native kernels off (the baseline
side) and on, `--baseline martlet-glibc` with glibc's malloc against the allocator `martlet sft` preloads (tcmalloc,
where the system has it; Martlet's sides run with it as the CLI would).

Settings shared by both sides: LoRA r8 / alpha 32 on all linear layers, LoRA dropout 0 (--lora_dropout: 0.05 is
the default of ms-swift and Martlet), 4 samples a step (no gradient accumulation), max length 512, learning
rate 1e-4, seed 42, the same samples in the same order.
- SFT data: self-cognition + general-instruct + 400 math word problems (tokenized once by Martlet's template; the baseline trains
  on the very same token ids and labels).
- Preference data (DPO, KTO as two unpaired rows a pair, ORPO, SimPO, CPO): pref-identity + pref-math-en.
Baseline: `transformers.Trainer` (trl's DPOTrainer / KTOTrainer, `trl.experimental`'s ORPOTrainer / CPOTrainer for
the preference losses) + peft, fp32, padding to the longest sample of the batch, nothing else. Martlet: `sft_main` / `rlhf_main` with its defaults (dtype AUTO, padding-free
rows, the lean loss, gradient checkpointing on).

`--epochs E` cuts both sides' data to steps x 4 / E samples (the same share from each dataset), so the steps run E
epochs over it, and also reports the tokens/s of the epochs after the first: where a trainer keeps what it computed
in the first (Martlet's DPO keeps its reference log-probs) the later epochs run faster.
With SFT and preference methods in one run, it ends with each method's tokens/s over Martlet's SFT's.

MARTLET_BENCH_ARGS="--name value ..." adds arguments to Martlet's side (for ablations).

Each side runs in its own process (peak RSS is per process). Both are timed by the same hook around
`Trainer.training_step`: seconds per step after 2 warm-up steps, and real tokens (attention-mask ones, or
every token of a padding-free row but the padding that rounds it up to a multiple of 64 on a CPU, a beginning that
samples share counted as often as samples hold it). It prints one table with the ratios, and writes JSON with
--json. The roofline share counts the tokens Martlet computes: a beginning that samples share (a system prompt, a
pair's prompt) once.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

# --cpu_isa avx2 acts before torch loads (here and in the sides' processes, which inherit the environment)
EMULATE = {"avx2": {"MARTLET_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
           "avx512": {"MARTLET_CPU_ISA": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512",
                      "MKL_ENABLE_INSTRUCTIONS": "AVX512"}}
if "--cpu_isa" in sys.argv[:-1]:
    os.environ.update(EMULATE.get(sys.argv[sys.argv.index("--cpu_isa") + 1], {}))

from martlet.templates import IGNORE_INDEX

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WARMUP = 2
EXTRA = os.environ.get("MARTLET_BENCH_ARGS", "").split()  # e.g. "--gradient_checkpointing false" (ablations)
SFT_DATA = ["self-cognition", "general-instruct", "math-word-problems#400"]
DPO_DATA = ["pref-identity", "pref-math-en"]
DROPOUT = [0.0]  # set from --lora_dropout in each process
EPOCHS = [1]  # set from --epochs in each process
DTYPE = ["bf16"]  # the training dtype of --dtype AUTO here (host_report)
COMMON = ["--max_length", "512", "--batch_size", "4", "--gradient_accumulation_steps", "1",
          "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32",
          "--lora_target_modules", "ALL", "--dataset_test_ratio", "0", "--logging_steps", "1",
          "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--seed", "42", "--report_to", "none",
          "--disable_tqdm", "true", "--model_name", "Martlet", "--model_author", "Birdhouse"]


def cut_data(names: list[str], steps: int, rows_a_sample: int = 1) -> list[str]:
    """The datasets, cut for --epochs: steps x 4 / EPOCHS training rows in all, the same number of samples from each
    (KTO trains on two rows a pair)."""
    if EPOCHS[0] == 1:
        return names
    each = max(1, steps * 4 // EPOCHS[0] // len(names) // rows_a_sample)
    return [f"{name.split('#')[0]}#{each}" for name in names]


def preference_data(kind: str, steps: int) -> list[str]:
    """DPO_DATA, cut for --epochs (KTO trains on a pair's two rows)."""
    return cut_data(DPO_DATA, steps, 2 if kind == "kto" else 1)


def padding_tokens(inputs: dict[str, Any]) -> int:
    """How many tokens of a padding-free row are `PaddingFreeCollator`'s padding: its last sample, when that is
    one token repeated with no label (no real sample is)."""
    position_ids, input_ids, labels = inputs.get("position_ids"), inputs.get("input_ids"), inputs.get("labels")
    if position_ids is None or input_ids is None or labels is None or position_ids.shape[0] != 1:
        return 0
    starts = (position_ids[0] == 0).nonzero().flatten()
    if len(starts) < 2:
        return 0
    start = int(starts[-1])
    tail_ids, tail_labels = input_ids[0, start:], labels[0, start:]
    return len(tail_ids) if bool((tail_ids == tail_ids[0]).all() and (tail_labels == IGNORE_INDEX).all()) else 0


def labelled_tokens(inputs: dict[str, Any]) -> int:
    """Tokens the loss reads (the LM head runs on those alone, at least): labels other than IGNORE_INDEX, or trl's
    completion mask."""
    import torch

    labels = [v for k, v in inputs.items() if k.endswith("labels") and torch.is_tensor(v) and v.dtype != torch.bool]
    if labels:
        return int(sum((v != IGNORE_INDEX).sum() for v in labels))
    masks = [v for k, v in inputs.items() if k.endswith("completion_mask") and torch.is_tensor(v)]
    return int(sum(m.sum() for m in masks))


# --------------------------------------------------------------------------------------------------------
# the instrument: identical for both sides
def instrument(record: dict) -> None:
    """Wrap Trainer.training_step to time each step and count its real tokens."""
    import torch
    from transformers import Trainer

    original = Trainer.training_step

    def timed(self, model, inputs, *args, **kwargs):
        from martlet.train.varlen_attention import row_samples

        tokens = computed = 0
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
        if masks:
            tokens = int(sum(m.sum() for m in masks))
        else:  # a padding-free row: every token, but the padding that rounds the row up (Martlet on a CPU), and the
            # samples' shared beginnings as often as samples hold them (the row holds each once)
            computed = int(sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids") and torch.is_tensor(v)))
            computed -= padding_tokens(inputs)
            tokens = computed + sum(s.prefix for s in row_samples(inputs.get("position_ids")) or ())
        start = time.perf_counter()
        loss = original(self, model, inputs, *args, **kwargs)
        record["steps"].append({"seconds": time.perf_counter() - start, "tokens": tokens,
                                "labelled": labelled_tokens(inputs),
                                "computed": record.pop("row", computed or tokens)})
        return loss

    Trainer.training_step = timed


def summary(record: dict, log_history: list[dict]) -> dict:
    timed = record["steps"][WARMUP:]
    seconds = sum(s["seconds"] for s in timed)
    later = record["steps"][len(record["steps"]) // EPOCHS[0]:] if EPOCHS[0] > 1 else []  # after the first epoch
    losses = [h["loss"] for h in log_history if "loss" in h]
    tokens = sum(s["tokens"] for s in timed)
    return {"steps": len(record["steps"]), "s_per_step": seconds / max(1, len(timed)),
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "later_epochs_tokens_per_s": sum(s["tokens"] for s in later) / max(sum(s["seconds"] for s in later), 1e-9),
            "computed_share": sum(s.get("computed", s["tokens"]) for s in timed) / max(tokens, 1),
            "labelled_share": sum(s.get("labelled", 0) for s in timed) / max(tokens, 1),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "losses": losses, "final_loss": sum(losses[-4:]) / max(1, len(losses[-4:]))}


# --------------------------------------------------------------------------------------------------------
# the sides (each runs in a child process)
def baseline_sft(steps: int, out_dir: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from martlet.args import SftArguments, parse_cli
    from martlet.data.preprocess import encode_rows, train_val_rows
    from martlet.models.loader import load_tokenizer, resolve_model
    from martlet.templates import get_template

    args = parse_cli(SftArguments, ["--dataset", *cut_data(SFT_DATA, steps), *COMMON])
    spec = resolve_model(None, None)
    tokenizer = load_tokenizer(spec.model_dir)
    template = get_template(None, tokenizer, None, 512, "delete", fallback=spec.template_type)
    train_rows, _ = train_val_rows(args)
    data, _ = encode_rows(train_rows, template)
    data = data.remove_columns(["length"])

    record = {"steps": []}
    instrument(record)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=DROPOUT[0], target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    targs = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                              max_steps=steps, learning_rate=1e-4, weight_decay=0.1, lr_scheduler_type="constant",
                              logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=42,
                              data_seed=42, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    return summary(record, trainer.state.log_history)


def unshared() -> None:
    """--baseline martlet-unshared: every sample and sequence whole, a shared beginning computed as often as held."""
    from martlet.train import batching

    if os.environ.get("MARTLET_BENCH_UNSHARED"):
        batching.SHARE_PREFIXES = False


def martlet_sft(steps: int, out_dir: str) -> dict:
    from martlet.train.sft import sft_main

    unshared()
    record = {"steps": []}
    instrument(record)
    result = sft_main(["--dataset", *cut_data(SFT_DATA, steps), *COMMON, "--lora_dropout", str(DROPOUT[0]),
                       "--max_steps", str(steps),
                       "--output_dir", out_dir, "--save_steps", str(10 * steps), "--save_only_model", "true", *EXTRA])
    return summary(record, result["log_history"])


def baseline_dpo(steps: int, out_dir: str) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from martlet.args import parse_cli
    from martlet.args.rlhf import DPOArguments
    from martlet.data.preference import preference_train_val_rows
    from martlet.models.loader import load_tokenizer, resolve_model

    args = parse_cli(DPOArguments, ["--dataset", *preference_data("dpo", steps), *COMMON])
    spec = resolve_model(None, None)
    tokenizer = load_tokenizer(spec.model_dir)
    data = _trl_pairs(preference_train_val_rows(args)[0])

    record = {"steps": []}
    instrument(record)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    config = DPOConfig(output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                       max_steps=steps, learning_rate=1e-4, weight_decay=0.1, lr_scheduler_type="constant",
                       logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=42, data_seed=42,
                       max_length=512, beta=0.1, disable_tqdm=True, bf16=False)  # fp32, as the SFT baseline
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=DROPOUT[0], target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.train()
    return summary(record, trainer.state.log_history)


def baseline_preference(kind: str, steps: int, out_dir: str) -> dict:
    """trl's own trainer for `kind` + peft, fp32, its defaults but the shared settings: KTOTrainer (stable), and
    ORPOTrainer / CPOTrainer from `trl.experimental` (SimPO is CPO with loss_type "simpo" and cpo_alpha 0)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from martlet.args import parse_cli
    from martlet.args.rlhf import RLHFArguments
    from martlet.data.preference import preference_train_val_rows
    from martlet.models.loader import load_tokenizer, resolve_model

    args = parse_cli(RLHFArguments, ["--rlhf_type", kind, "--dataset", *preference_data(kind, steps), *COMMON])
    spec = resolve_model(None, None)
    tokenizer = load_tokenizer(spec.model_dir)
    rows = preference_train_val_rows(args)[0]
    shared = dict(output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=steps,
                  learning_rate=1e-4, weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1,
                  save_strategy="no", report_to="none", use_cpu=True, seed=42, data_seed=42, max_length=512,
                  disable_tqdm=True, bf16=False)
    if kind == "kto":
        from trl import KTOConfig as Config, KTOTrainer as TrainerClass

        import datasets

        data = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": [{"role": "assistant",
                                                                                   "content": r["completion"]}],
                                            "label": r["label"]} for r in rows])
        config = Config(**shared, beta=0.1)
    elif kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as TrainerClass

        data, config = _trl_pairs(rows), Config(**shared, beta=0.1)
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as TrainerClass

        extra = {"loss_type": "simpo", "cpo_alpha": 0.0} if kind == "simpo" else {}
        data, config = _trl_pairs(rows), Config(**shared, beta=2.0 if kind == "simpo" else 0.1, **extra)

    record = {"steps": []}
    instrument(record)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    trainer = TrainerClass(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                           peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=DROPOUT[0],
                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    return summary(record, trainer.state.log_history)


def martlet_preference(kind: str, steps: int, out_dir: str) -> dict:
    from martlet.train import rlhf_trainers
    from martlet.train.rlhf import rlhf_main

    unshared()
    record = {"steps": []}
    instrument(record)
    decoded_row = rlhf_trainers._decoded_row

    def counted(lm, input_ids, attention_mask):  # the tokens a step computes: a pair's shared prompt once
        hidden, slot = decoded_row(lm, input_ids, attention_mask)
        record["row"] = int(slot.max()) + 1  # (DPO: the reference's row and the policy's are the same)
        return hidden, slot

    if kind != "kto":  # (KTO's rows are counted whole: its KL rows and its replies run in passes of their own)
        rlhf_trainers._decoded_row = counted
    result = rlhf_main(["--rlhf_type", kind, "--dataset", *preference_data(kind, steps), *COMMON,
                        "--lora_dropout", str(DROPOUT[0]),
                        "--max_steps", str(steps),
                        "--output_dir", out_dir, "--save_steps", str(10 * steps), "--save_only_model", "true",
                        *EXTRA])
    return summary(record, result["log_history"])


def _trl_pairs(rows: list[dict]):
    """Martlet's preference rows as trl's conversational prompt/chosen/rejected."""
    import datasets

    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    return datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": reply(r["chosen"]),
                                        "rejected": reply(r["rejected"])} for r in rows])


PREFERENCE = ("dpo", "kto", "orpo", "simpo", "cpo")
SIDES = {"baseline-sft": baseline_sft, "martlet-sft": martlet_sft, "baseline-dpo": baseline_dpo,
         **{f"martlet-{kind}": functools.partial(martlet_preference, kind) for kind in PREFERENCE},
         **{f"baseline-{kind}": functools.partial(baseline_preference, kind) for kind in PREFERENCE if kind != "dpo"}}


# --------------------------------------------------------------------------------------------------------
def side_environment(side: str, env: dict[str, str] | None) -> dict[str, str]:
    """A side's environment: Martlet's sides with the memory allocator `martlet <command>` preloads (none where
    the system has none, or under MARTLET_MALLOC=system: --baseline martlet-glibc)."""
    from martlet.launch import allocator_environment

    merged = {**os.environ, **(env or {})}
    return (side.startswith("martlet-") and allocator_environment("sft", merged)) or merged


def run_side(side: str, steps: int, env: dict[str, str] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(steps), "--result", result_file,
               "--out", os.path.join(tmp, "out"), "--lora_dropout", str(DROPOUT[0]), "--epochs", str(EPOCHS[0])]
        print(f"running {side} ...", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None,
                       env=side_environment(side, env))
        with open(result_file, encoding="utf-8") as fh:
            return json.load(fh)


def median_round(results: list[dict]) -> dict:
    """The round with the median tokens/s (its own s/step, loss; the peak RSS is the largest of all rounds)."""
    ordered = sorted(results, key=lambda r: r["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "peak_rss_gib": max(r["peak_rss_gib"] for r in results)}


def table(what: str, base: dict, ours: dict) -> str:
    rows = [("real tokens/s", "tokens_per_s", "{:.1f}"), ("s/step", "s_per_step", "{:.2f}"),
            *([("real tokens/s, epochs 2+", "later_epochs_tokens_per_s", "{:.1f}")] if EPOCHS[0] > 1 else []),
            ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"), ("loss (mean of last 4 steps)", "final_loss", "{:.4f}")]
    lines = [f"{what}: {base['steps']} steps of 4 samples ({WARMUP} warm-up steps not timed)",
             f"| {'':28} | {'baseline':>10} | {'martlet':>10} | {'ratio':>7} |", f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|{'-' * 9}|"]
    for label, key, fmt in rows:
        ratio = ours[key] / base[key] if base[key] else float("nan")
        lines.append(f"| {label:28} | {fmt.format(base[key]):>10} | {fmt.format(ours[key]):>10} | {ratio:>6.2f}x |")
    diffs = [abs(a - b) for a, b in zip(base["losses"], ours["losses"])]
    lines.append(f"per-step loss: largest difference {max(diffs, default=0):.4f} over {len(diffs)} steps")
    return "\n".join(lines)


def matmul_flops(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """This host's matrix product speed in the dtype training computes in (FLOP/s, best of `repeats`, torch's product
    or the packed one, whichever is faster), measured now: the roofline's ceiling."""
    import torch

    from martlet.train import packed

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    products = [lambda: a @ b]
    if packed.usable(dtype):  # and on b^T packed, as Martlet's base layers run
        b_t = b.t().contiguous()
        b_t._martlet_packed = packed.PackedWeight.of(b_t, size)
        products.append(lambda: packed.linear(a, b_t))
    best = float("inf")
    for product in products:
        product()  # warm-up (oneDNN builds its kernel)
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def model_shapes() -> tuple[int, int]:
    """(parameters of the decoder layers' matrices, parameters of the LM head) of the embedded model."""
    from safetensors import safe_open

    from martlet.models.embedded import embedded_model_dir

    folder, layers, head = embedded_model_dir(), 0, 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as fh:
                for key in fh.keys():
                    shape = fh.get_slice(key).get_shape()
                    if len(shape) == 2 and ".layers." in key:
                        layers += math.prod(shape)
                    elif len(shape) == 2 and ("embed_tokens" in key or "lm_head" in key):
                        head = max(head, math.prod(shape))  # tied: one matrix
    return layers, head


def matrix_shapes() -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The (out, in) shape of every matrix of the embedded model's decoder layers, and the LM head's."""
    from safetensors import safe_open

    from martlet.models.embedded import embedded_model_dir

    folder, layers, head = embedded_model_dir(), [], (0, 0)
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as fh:
                for key in fh.keys():
                    shape = tuple(fh.get_slice(key).get_shape())
                    if len(shape) == 2 and ".layers." in key:
                        layers.append(shape)
                    elif len(shape) == 2 and ("embed_tokens" in key or "lm_head" in key):
                        head = shape
    return layers, head


def products_alone(what: str, rows: int, labelled: int, dtype_name: str) -> float:
    """Tokens/s of the matrix products of a step alone, at this run's row size: each decoder matrix forward and its
    input gradient at `rows` tokens, the LM head the same at `labelled` tokens, timed one shape at a time (best of
    15; torch's product or the packed one, whichever is faster), scaled by `PER_PARAMETER` (DPO's reference forward, KTO's KL rows). The ceiling at these shapes: thin
    products run below the 2048 x 2048 speed."""
    import collections

    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    layers, head = matrix_shapes()
    shapes = collections.Counter((out, inp, rows) for out, inp in layers)
    shapes[(head[0], head[1], max(1, labelled))] += 1

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(15):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    seconds = 0.0
    for (out, inp, n), count in shapes.items():
        x, w = torch.randn(n, inp, dtype=dtype), torch.randn(out, inp, dtype=dtype)
        dy = torch.randn(n, out, dtype=dtype)
        plain = best(lambda: torch.nn.functional.linear(x, w)) + best(lambda: dy @ w)
        seconds += count * min(plain, packed_products(x, w, dy, best))
    return rows / (seconds * per_parameter(what) / 4)


def packed_products(x, w, dy, best) -> float:
    """The seconds of `x W^T` and `dy W` on W packed for oneDNN (Martlet's LoRA base layers, `train/packed.py`), by
    `best`; infinite where the packed ops are not there."""
    from martlet.train import packed

    if not packed.usable(w.dtype):
        return float("inf")
    w._martlet_packed = packed.PackedWeight.of(w)
    return best(lambda: packed.linear(x, w)) + best(lambda: packed.input_grad(dy, w))


def flop_per_token(what: str, labelled_share: float) -> float:
    """The matrix-product FLOP a real token costs in LoRA training (the adapters' and the attention's own products,
    a few percent here, left out): the frozen layers' forward and input-gradient products (2 + 2 FLOP a
    parameter), the LM head the same at the tokens the loss reads; `PER_PARAMETER` for the preference losses."""
    layers, head = model_shapes()
    return per_parameter(what) * (layers + head * labelled_share)


# FLOP a parameter and token: policy forward 2 + input gradient 2; the reference's forward 2 more (DPO, KTO). KTO's
# counted tokens are half KL rows (each row's prompt with its neighbour's reply), which go forward through policy
# (no gradient) and reference only: 4, so (6 + 4) / 2 a token. ORPO, SimPO and CPO have no reference.
PER_PARAMETER = {"sft": 4, "dpo": 6, "kto": 5, "orpo": 4, "simpo": 4, "cpo": 4}


def per_parameter(what: str) -> float:
    """`PER_PARAMETER`, over the run's --epochs: Martlet's DPO and KTO run the reference's forward in the first only
    (KTO's later epochs: 4 a reply token, 2 a KL row's)."""
    later = {"dpo": 4, "kto": 3}.get(what, PER_PARAMETER[what])
    return (PER_PARAMETER[what] + later * (EPOCHS[0] - 1)) / EPOCHS[0]


def issue_measure(what: str, counted: float, flops: float) -> str:
    """The roofline as issue #23 counts it: every counted token at PER_PARAMETER FLOP a parameter of the whole model
    (SFT: 4 x 135 M; the LM head at every token, a shared beginning as often as held), so what a run skips (a
    shared beginning, the head at unlabelled tokens) counts as speed, where the share above counts it as work not
    done."""
    layers, head = model_shapes()
    limit = flops / (per_parameter(what) * (layers + head))
    return (f"by the issue's measure (every counted token at {per_parameter(what):g} FLOP a parameter of the whole "
            f"model): {counted / limit:.0%} ({counted:.0f} of {limit:.0f} tokens/s)")


def host_report() -> float:
    """Print the CPU features, the kernel path and this host's matrix-product speed in the training dtype (the
    roofline's ceiling, FLOP/s), and return that speed."""
    import platform

    from martlet.train import native

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"CPU features: {', '.join(native.cpu_features()) or 'none of avx2/avx512/amx/asimd/sve'}")
    print(f"kernel path: {native.kernel_path()}")
    from martlet.launch import SYSTEM_MALLOC

    library = side_environment("martlet-sft", None).get("LD_PRELOAD") or SYSTEM_MALLOC
    print(f"memory allocator (Martlet's side, as `martlet sft` runs): {library}")
    from martlet.models.dtype import resolve_dtype

    dtype = resolve_dtype("AUTO", "cpu")  # what --dtype AUTO trains in here: bf16 with AVX512-BF16 or AMX, else fp32
    DTYPE[0] = dtype
    flops = matmul_flops(dtype)
    layers, head = model_shapes()
    print(f"{dtype} matmul here: {flops / 1e9:.0f} GFLOP/s (2048 x 2048); model: {layers / 1e6:.1f} M parameters in "
          f"the decoder layers' matrices, {head / 1e6:.1f} M in the LM head", flush=True)
    return flops


# the baseline side: plain libraries, or Martlet under these environment variables
BASELINES = {"plain": None, "martlet-torch": {"MARTLET_NATIVE": "0"},
             "martlet-unpacked": {"MARTLET_PACKED_WEIGHTS": "0"}, "martlet-unshared": {"MARTLET_BENCH_UNSHARED": "1"},
             "martlet-buckets": {"MARTLET_FUSED_ATTENTION": "0"}, "martlet-glibc": {"MARTLET_MALLOC": "system"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--what", default="both",
                        help="comma-separated: sft, dpo, kto, orpo, simpo, cpo; both = sft,dpo; all = every one")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the sides in turn this many times (baseline, martlet, baseline, ...) and report each "
                             "side's median round: the host's speed drifts by ~20%% over minutes")
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout of both sides")
    parser.add_argument("--epochs", type=int, default=1,
                        help="cut the data so that --steps run this many epochs over it (and report the later "
                             "epochs' tokens/s too)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--cpu_isa", choices=["native", *EMULATE],
                        help="avx2: both sides run as on a CPU with AVX2 and no AVX-512/AMX (torch's kernels limited "
                             "by ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY, Martlet's built for x86-64-v3, dtype "
                             "AUTO fp32); avx512: as on AVX-512 without BF16 or AMX (a Skylake-SP to Ice Lake Xeon: "
                             "x86-64-v4, fp32)")
    parser.add_argument("--baseline", choices=tuple(BASELINES), default="plain",
                        help="plain: transformers Trainer / trl + peft; martlet-torch: Martlet with its native "
                             "kernels off (MARTLET_NATIVE=0), to see what the kernels themselves give on this CPU; "
                             "martlet-unpacked: Martlet with its frozen weights unpacked (MARTLET_PACKED_WEIGHTS=0); "
                             "martlet-unshared: Martlet with every sample and sequence whole (a system prompt, a "
                             "pair's prompt computed as often as held); martlet-buckets: Martlet's attention in "
                             "batched torch products a bucket of samples instead of its fused native pass "
                             "(MARTLET_FUSED_ATTENTION=0)")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    DROPOUT[0] = args.lora_dropout
    EPOCHS[0] = args.epochs
    if args.side:  # a child process: one side, its numbers to --result
        result = SIDES[args.side](args.steps, args.out)
        with open(args.result, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        return

    kinds = {"both": "sft,dpo", "all": ",".join(("sft", *PREFERENCE))}.get(args.what, args.what).split(",")
    unknown = [k for k in kinds if k not in PER_PARAMETER]
    if unknown:
        parser.error(f"--what: unknown {unknown}; choose from {sorted(PER_PARAMETER)}, both, all")
    flops = host_report()
    results = {}
    for what in kinds:
        baseline = ((f"baseline-{what}", None) if args.baseline == "plain"
                    else (f"martlet-{what}", BASELINES[args.baseline]))
        rounds = [(run_side(baseline[0], args.steps, baseline[1]), run_side(f"martlet-{what}", args.steps))
                  for _ in range(args.rounds)]
        base, ours = median_round([r[0] for r in rounds]), median_round([r[1] for r in rounds])
        results[what] = {"baseline": base, "martlet": ours, "rounds": rounds}
        print(f"baseline: {'transformers Trainer / trl + peft' if args.baseline == 'plain' else args.baseline}"
              f"{'; emulated CPU: ' + args.cpu_isa if args.cpu_isa not in (None, 'native') else ''}")
        print(table(what.upper(), base, ours), flush=True)
        # the roofline counts the tokens Martlet computes: a pair's shared prompt once (`computed_share`)
        computed = ours.get("computed_share", 1.0)
        share = (ours["labelled_share"] or base["labelled_share"]) / computed
        cost = flop_per_token(what, share)
        roofline = flops / cost
        speed = ours["tokens_per_s"] * computed
        if computed < 1:
            print(f"Martlet computes {computed:.0%} of the tokens it counts (sequences that begin alike share their "
                  f"beginning): {speed:.0f} tokens computed a second")
        print(f"Martlet at {speed / roofline:.0%} of this host's roofline "
              f"({speed:.0f} of {roofline:.0f} tokens/s: {flops / 1e9:.0f} GFLOP/s over "
              f"{cost / 1e6:.0f} MFLOP a token, {share:.0%} of tokens labelled)", flush=True)
        print(issue_measure(what, ours["tokens_per_s"], flops), flush=True)
        per_step = speed * ours["s_per_step"]
        alone = products_alone(what, round(per_step), round(per_step * share), DTYPE[0])
        print(f"the same products alone at this run's mean row ({per_step:.0f} tokens, {share:.0%} labelled): "
              f"{alone:.0f} tokens/s ({alone / roofline:.0%} of the roofline); Martlet at "
              f"{speed / alone:.0%} of that", flush=True)
        if args.rounds > 1:
            print("tokens/s ratio of each round: " + ", ".join(f"{o['tokens_per_s'] / b['tokens_per_s']:.2f}x"
                                                              for b, o in rounds), flush=True)
    if "sft" in results:  # the issue's bar for the preference methods: no slower per token than SFT
        sft = results["sft"]["martlet"]
        for what in (k for k in kinds if k != "sft"):
            ours = results[what]["martlet"]
            later = (f" (epochs 2+: {ours['later_epochs_tokens_per_s'] / sft['later_epochs_tokens_per_s']:.2f}x)"
                     if EPOCHS[0] > 1 else "")
            print(f"Martlet's {what.upper()} per token: {ours['tokens_per_s'] / sft['tokens_per_s']:.2f}x its SFT's "
                  f"tokens/s{later}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
