"""The run folder every training command shares: checked before any work (writable, room for a checkpoint, no
other run in it), the checkpoint to resume from, and the folder opened (new, or the one being resumed)."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile

from martlet.args import SftArguments
from martlet.errors import MartletError
from martlet.launch import broadcast, is_main_process
from martlet.train.outputs import ARGS_FILE, RUN_INFO_FILE, RunFiles, new_run_dir
from martlet.train.trainer import checkpoint_problem, checkpoints_newest_first, trim_log

logger = logging.getLogger("martlet")
# what a run leaves in its folder: another run written there would mix with it
RUN_FILES = ("checkpoint-*", ".tmp-checkpoint-*", "logging.jsonl", ARGS_FILE, RUN_INFO_FILE, "images", "runs")
ONLY_MODEL_HINT = ("Resume from a whole checkpoint, or pass --resume_only_model true to start a new run from its "
                   "weights alone (fresh optimizer and learning-rate schedule).")


def pick_checkpoint(args: SftArguments) -> tuple[str | None, list[str]]:
    """(the checkpoint to resume from, absolute, or None; the newer checkpoints passed over, each with why).

    `true` picks the newest whole checkpoint under --output_dir; a folder named explicitly must be whole. With
    --resume_only_model only the weights are asked for."""
    value, only_model = args.resume_from_checkpoint, args.resume_only_model
    if not value:
        if only_model:
            raise MartletError("needs --resume_from_checkpoint (the checkpoint whose weights to load).",
                               field="resume_only_model")
        return None, []
    hint = None if only_model else ONLY_MODEL_HINT
    if str(value).lower() != "true":
        problem = checkpoint_problem(value, weights_only=only_model)
        if problem:
            raise MartletError(f"not a whole checkpoint: {problem}.", file=value, field="resume_from_checkpoint",
                               hint=hint)
        return os.path.abspath(value), []
    skipped = []
    for path in checkpoints_newest_first(args.output_dir) if os.path.isdir(args.output_dir) else []:
        problem = checkpoint_problem(path, weights_only=only_model)
        if problem is None:
            return os.path.abspath(path), skipped
        skipped.append(f"{os.path.abspath(path)}: {problem}")
    wanted = "checkpoint with weights" if only_model else "whole checkpoint"
    newest = f" (newest: {skipped[0]})" if skipped else ""
    raise MartletError(f"no {wanted} to resume from{newest}.", file=args.output_dir,
                       field="resume_from_checkpoint",
                       hint=ONLY_MODEL_HINT if skipped and not only_model else "Start without --resume_from_checkpoint.")


def resume_checkpoint(args: SftArguments) -> str | None:
    """The checkpoint to resume from (see `pick_checkpoint`), saying which newer ones were skipped and why."""
    checkpoint, skipped = pick_checkpoint(args)
    for line in skipped:
        logger.warning("resume: skipped %s (not a whole checkpoint)", line)
    if checkpoint and args.resume_only_model:
        logger.warning("--resume_only_model: loading only the weights of %s; the optimizer, learning-rate schedule, "
                       "RNG state and step count start afresh, in a new run folder.", checkpoint)
    return checkpoint


def previous_run_files(folder: str) -> list[str]:
    """The names in `folder` that another run wrote there (checkpoints, logs, arguments, curves)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in RUN_FILES))


def check_run_folder(args: SftArguments) -> None:
    """A new run written straight into --output_dir (--add_output_dir_suffix false) finds no other run there,
    or is told to replace it (--overwrite_output_dir). A resumed run continues in its own folder."""
    resuming = args.resume_from_checkpoint and not args.resume_only_model
    if args.add_output_dir_suffix or resuming or not is_main_process():
        return
    folder = os.path.abspath(args.output_dir)
    found = previous_run_files(folder)
    if found and not args.overwrite_output_dir:
        raise MartletError(f"already holds another run ({', '.join(found[:4])}).", file=folder, field="output_dir",
                           hint="Resume it with --resume_from_checkpoint true, choose another --output_dir, or pass "
                                "--overwrite_output_dir true to delete it and start afresh.")
    if found and args.resume_only_model and os.path.dirname(pick_checkpoint(args)[0]) == folder:
        raise MartletError("--overwrite_output_dir would delete the checkpoint whose weights this run loads.",
                           file=folder, field="overwrite_output_dir", hint="Choose another --output_dir.")


def open_run_dir(args: SftArguments, model_type: str, run_files: RunFiles, checkpoint: str | None) -> str:
    """A new run folder, or the resumed checkpoint's own (its log cut back to the checkpoint's step), with the
    run files written in it."""
    if not is_main_process():  # under torchrun only rank 0 writes; the others learn its folder
        return broadcast(None)
    if checkpoint and not args.resume_only_model:
        run_dir = os.path.dirname(checkpoint)
        trim_log(os.path.join(run_dir, "logging.jsonl"), int(os.path.basename(checkpoint).split("-")[1]))
        logger.info("resuming %s from %s", run_dir, checkpoint)
    else:
        run_dir = new_run_dir(args.output_dir, model_type, args.add_output_dir_suffix)
        replaced = previous_run_files(run_dir) if args.overwrite_output_dir else []
        for name in replaced:  # (check_run_folder refused them without --overwrite_output_dir)
            path = os.path.join(run_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        if replaced:
            logger.warning("--overwrite_output_dir: deleted the previous run's %s in %s", ", ".join(replaced), run_dir)
        os.makedirs(run_dir, exist_ok=True)
    run_files.write(run_dir)
    logger.info("run folder: %s", run_dir)
    return broadcast(run_dir)


def check_output_dir(args: SftArguments, model_dir: str) -> None:
    """Before any work: the output folder can be created and written, and has room for a checkpoint
    (full training: about 4x the model files, for weights and optimizer state; LoRA: a tenth)."""
    if not is_main_process():
        return
    target = os.path.abspath(args.output_dir)
    probe_dir = target
    while not os.path.isdir(probe_dir):  # the nearest existing folder decides
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        if os.path.exists(probe_dir):
            raise MartletError("is a file, not a folder.", file=probe_dir, field="output_dir")
        probe_dir = parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".martlet-write-test-"):
            pass
    except OSError as exc:
        raise MartletError(f"cannot write there ({exc.strerror or exc}).", file=target, field="output_dir") from None
    model_bytes = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(model_dir)
                      for f in files if f.endswith((".safetensors", ".bin")))
    needed = int(model_bytes * (4 if args.sft_type == "full" else 0.1)) + 50 * 2**20
    free = shutil.disk_usage(probe_dir).free
    if free < needed:
        raise MartletError(f"only {free / 2**30:.2f} GiB free, a checkpoint needs about {needed / 2**30:.2f} GiB.",
                           file=target, field="output_dir", hint="Free some space or choose another --output_dir.")
