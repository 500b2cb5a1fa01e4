"""The one training pipeline every training command runs (sft, pt, and each rlhf type):

prepare (registrations, device, dtype, model files, output folder checks, tokenizer, template) -> data -> model
(+LoRA) -> reference -> run info -> run folder -> trainer -> train (a signal saves and stops) -> curves -> result.

A command supplies what differs, as a `TrainingMethod`: how rows become examples and which trainer runs. The
state of a run is typed and built once: `RunSetup` after preparing, `TrainingRun` once the run folder is open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from transformers import Trainer, TrainerState

from martlet.args import SftArguments
from martlet.custom import apply_custom_registrations
from martlet.errors import MartletError
from martlet.launch import allocator_report, main_process_first
from martlet.models.dtype import resolve_dtype
from martlet.models.loader import ModelSpec, load_tokenizer, resolve_model
from martlet.templates import Template, get_template
from martlet.train.callbacks import training_callbacks
from martlet.train.model_setup import load_for_training
from martlet.train.outputs import RunFiles, RunInfo, plot_history
from martlet.train.batching import PaddingFreeCollator
from martlet.train.packed import packed_frozen_weights, products_packed
from martlet.train.run import check_output_dir, check_run_folder, open_run_dir, pick_checkpoint, resume_checkpoint
from martlet.train.trainer import StopOnSignal
from martlet.train.training_args import training_kwargs
from martlet.utils import frozen_heap, libraries_quietly

logger = logging.getLogger("martlet")


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a run knows once prepared: its validated arguments, where and in what precision it trains, the model
    files, and the tokenizer with the chat template every checkpoint saves."""

    args: SftArguments
    device: str
    dtype: str
    spec: ModelSpec
    tokenizer: Any
    template: Template


@dataclasses.dataclass(frozen=True)
class TrainingRun(RunSetup):
    """A prepared run with its folder open: the run info (written once, in the folder and in every checkpoint)
    and the checkpoint it resumes from (None for a fresh run)."""

    run_dir: str
    info: RunInfo
    checkpoint: str | None

    @property
    def run_files(self) -> RunFiles:
        return RunFiles(self.args, self.info)

    def training_kwargs(self, model: Any, has_eval: bool) -> dict[str, Any]:
        return training_kwargs(self.args, self.run_dir, self.dtype, self.device, has_eval, model)

    def callbacks(self, has_eval: bool) -> list[Any]:
        return training_callbacks(self.run_dir, has_eval)


@dataclasses.dataclass(frozen=True)
class EncodedData:
    """The tokenized training and validation sets (val None when there is none) and their length statistics."""

    train: Any
    val: Any
    stats: dict[str, Any]


def encode_split(encode: Any, train_rows: list, val_rows: list, template: Template, **options: Any) -> EncodedData:
    """Tokenize the training and validation rows with `encode(rows, template, [what=], **options)` -> (set, stats);
    under torchrun rank 0 tokenizes and caches first, the others read its cache."""
    with main_process_first():
        train_set, train_stats = encode(train_rows, template, **options)
        val_set, val_stats = encode(val_rows, template, what="val", **options) if val_rows else (None, None)
    return EncodedData(train_set, val_set, {"train": train_stats, "val": val_stats})


@dataclasses.dataclass(frozen=True)
class Reference:
    """A preference method's reference: the frozen model (None when there is none to load) and what it is."""

    model: Any = None
    description: str | None = None


class TrainingMethod(Protocol):
    """What a training command gives `run_training`: how rows become examples, and which trainer runs."""

    cut_in_template: bool  # whether the template itself cuts rows to --max_length (SFT), or the method does

    def command(self, args: SftArguments) -> str: ...

    def encode(self, setup: RunSetup) -> EncodedData: ...

    def reference(self, setup: RunSetup) -> Reference: ...

    def build_trainer(self, run: TrainingRun, model: Any, reference: Reference, data: EncodedData) -> Trainer: ...


def run_training(args: SftArguments, method: TrainingMethod) -> dict[str, Any]:
    """Train with validated `args` as `method` says; returns {best_model_checkpoint, last_model_checkpoint, ...}."""
    with frozen_heap() as freeze:  # (startup: the collector's full passes; utils.frozen_heap)
        setup = prepare_run(args, cut_in_template=method.cut_in_template)
        data = method.encode(setup)
        load = getattr(method, "load_model", load_for_training)  # (a reward model: a score head, not an LM head)
        model = load(args, setup.spec, setup.dtype, setup.device)
        reference = method.reference(setup)
        checkpoint = resume_checkpoint(args)
        info = RunInfo.of(args, setup.spec, setup.template, command=method.command(args), dtype=setup.dtype,
                          data=data.stats, reference=reference.description)
        run_dir = open_run_dir(args, setup.spec.model_type, RunFiles(args, info), checkpoint)
        run = TrainingRun(**{f.name: getattr(setup, f.name) for f in dataclasses.fields(RunSetup)}, run_dir=run_dir,
                          info=info, checkpoint=checkpoint)
        trainer = method.build_trainer(run, model, reference, data)
        freeze()  # the model, tokenizer, data and trainer: they live as long as the run
        return train_and_report(trainer, run)


def prepare_run(args: SftArguments, *, cut_in_template: bool = True) -> RunSetup:
    """The run's setup from validated training arguments: registrations applied first, then the model resolved
    and the output folder checked before any work, then the tokenizer and its chat template."""
    apply_custom_registrations(args)  # before any model, template or dataset name is resolved
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    logger.info(allocator_report())
    spec = resolve_model(args.model_type, args.model_id_or_path, check_model_is_latest=args.check_model_is_latest,
                         revision=args.model_revision, hub_token=args.hub_token)
    check_output_dir(args, spec.model_dir)  # writable, with room for a checkpoint
    pick_checkpoint(args)  # a checkpoint that is not whole stops the run here, before any work
    check_run_folder(args)  # no mixing with another run written into the same folder
    tokenizer = load_tokenizer(spec.model_dir, trust_remote_code=args.trust_remote_code)
    if cut_in_template:
        template = get_template(args.template_type, tokenizer, args.system, args.max_length,
                                args.truncation_strategy, fallback=spec.template_type)
    else:  # (preference pairs: lengths are checked per pair, prompt + longer reply)
        template = get_template(args.template_type, tokenizer, args.system, None, fallback=spec.template_type)
    tokenizer.chat_template = template.chat_template  # saved with every checkpoint
    return RunSetup(args=args, device=device, dtype=dtype, spec=spec, tokenizer=tokenizer, template=template)


@contextlib.contextmanager
def weights_packed_for(trainer: Trainer) -> Iterator[int]:
    """The trainer's frozen weights packed for a CPU's products while it trains (`train/packed.py`), unless it runs
    under torch.compile, whose graphs run their own products; while every product runs on them, the padding-free
    collator's rows are not rounded up (`kernels.row_multiple`)."""
    if trainer.args.torch_compile:
        yield 0
        return
    collator = getattr(trainer, "data_collator", None)
    rounding = getattr(collator, "pad_to_multiple_of", None)
    with packed_frozen_weights(trainer.model) as count:
        if isinstance(collator, PaddingFreeCollator) and products_packed(trainer.model):
            collator.pad_to_multiple_of = 1
        try:
            yield count
        finally:
            if isinstance(collator, PaddingFreeCollator):
                collator.pad_to_multiple_of = rounding


def check_a_batch(trainer: Trainer) -> None:
    """A training set too small for one batch makes no step, and the Trainer ends at step 0 as if it had trained (GRPO:
    a generation batch takes --batch_size x --gradient_accumulation_steps completions of different prompts, whole
    batches only): say so before training."""
    try:
        batches = len(trainer.get_train_dataloader())
    except TypeError:  # an iterable dataset: no length to know
        return
    if batches:
        return
    args, rows = trainer.args, len(trainer.train_dataset)
    generations, completions = getattr(args, "num_generations", None), getattr(args, "generation_batch_size", None)
    need = (f"{completions // generations} different prompts a generation batch ({completions} completions, "
            f"{generations} a prompt)" if generations and completions else f"{args.per_device_train_batch_size} rows")
    raise MartletError(f"the training set's {rows} rows make no batch: one takes {need}, so no step would run.",
                       field="dataset",
                       hint="Use more rows, or a smaller --batch_size or --gradient_accumulation_steps.")


def train_and_report(trainer: Trainer, run: TrainingRun) -> dict[str, Any]:
    """Train (a signal saves and stops), plot the curves and return the result dict."""
    args, checkpoint = run.args, run.checkpoint
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    if checkpoint and args.resume_only_model:
        trainer._load_from_checkpoint(checkpoint)  # the weights alone, by transformers' own loader
        checkpoint = None
    finished = _finished_state(trainer, checkpoint) if checkpoint else None
    if finished is not None:  # the Trainer would still take one more step
        trainer.state = finished
        logger.info("%s is already at step %d: nothing left to train (raise --max_steps or "
                    "--num_train_epochs to train on).", checkpoint, finished.global_step)
    else:
        check_a_batch(trainer)
        # (libraries_quietly: trl's reference forward and generation ask transformers deprecated questions)
        with stopper.installed(), weights_packed_for(trainer), libraries_quietly():
            trainer.train(resume_from_checkpoint=checkpoint)
    state, run_dir = trainer.state, run.run_dir
    last = os.path.join(run_dir, f"checkpoint-{state.global_step}")
    # absolute, as a fresh run's (the state read back from a checkpoint holds the paths of the run that wrote it)
    best = os.path.join(run_dir, os.path.basename(state.best_model_checkpoint)) if state.best_model_checkpoint else last
    images = plot_history(state.log_history, os.path.join(run_dir, "images")) if trainer.is_world_process_zero() else []
    result = {"best_model_checkpoint": best, "last_model_checkpoint": last, "best_metric": state.best_metric,
              "global_step": state.global_step, "log_history": state.log_history, "output_dir": run_dir,
              "images": images, "dataset_info": run.info.data, "interrupted": stopper.received is not None}
    if stopper.received is not None:
        logger.warning("stopped at step %d; resume with: --resume_from_checkpoint %s", state.global_step, last)
    logger.info("best_model_checkpoint: %s", best)
    logger.info("last_model_checkpoint: %s", last)
    return result


def _finished_state(trainer: Trainer, checkpoint: str) -> TrainerState | None:
    """The checkpoint's TrainerState when it already holds every step this run asks for (as the Trainer counts
    them), else None."""
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    total = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    return state if state.global_step >= total else None
