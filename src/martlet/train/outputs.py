"""What a run writes: its folder, the arguments, logging.jsonl, loss curves, checkpoint metadata."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import re
from typing import Any

from martlet.args import SftArguments
from martlet.args.base import to_dict
from martlet.models.loader import ModelSpec
from martlet.templates import Template

ARGS_FILE = "sft_args.json"
RUN_INFO_FILE = "martlet_run.json"


def new_run_dir(output_dir: str, model_type: str, add_suffix: bool = True) -> str:
    """<output_dir>/<model_type>/v<N>-<YYYYMMDD-HHMMSS>, N counting the runs already there."""
    if not add_suffix:
        return os.path.abspath(output_dir)
    parent = os.path.join(os.path.abspath(output_dir), model_type)
    existing = [d for d in os.listdir(parent) if re.match(r"v\d+-", d)] if os.path.isdir(parent) else []
    version = max((int(d[1:].split("-")[0]) for d in existing), default=-1) + 1
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(parent, f"v{version}-{stamp}")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("martlet", "torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=2, default=str)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What reproduces the run and what later commands need (`--ckpt_dir` alone is enough): martlet_run.json.

    Built once, when the data and the model are known, and given to the trainer when it is built."""

    command: str
    model_type: str
    model_dir: str
    template_type: str
    system: str | None
    eot: Any
    stop_words: Any
    sft_type: str | None
    dtype: str
    data: dict[str, Any]
    reference: str | None = None  # preference training: what the reference model is
    versions: dict[str, str] = dataclasses.field(default_factory=library_versions)

    @classmethod
    def of(cls, args: SftArguments, spec: ModelSpec, template: Template, *, command: str, dtype: str, data: dict[str, Any],
           reference: str | None = None) -> "RunInfo":
        return cls(command=command, model_type=spec.model_type, model_dir=spec.model_dir,
                   template_type=template.template_type, system=template.system, eot=template.eot,
                   stop_words=template.stop_words, sft_type=args.sft_type, dtype=dtype, data=data,
                   reference=reference)

    def to_dict(self) -> dict[str, Any]:
        """The file's keys, in the order the file has always had them (`reference` only where there is one)."""
        keys = ("command", "model_type", "model_dir", "template_type", "system", "eot", "stop_words", "sft_type",
                "versions", "dtype", "data") + (("reference",) if self.reference is not None else ())
        return {key: getattr(self, key) for key in keys}


def _absolute_files(specs: list[str]) -> list[str]:
    """Dataset entries that are files, with absolute paths, so the saved arguments work from any folder."""
    out = []
    for spec in specs:
        path, sep, count = spec.rpartition("#") if "#" in spec else (spec, "", "")
        out.append(os.path.abspath(path) + sep + count if os.path.isfile(path) else spec)
    return out


def save_run_files(folder: str, args: SftArguments, info: RunInfo) -> None:
    """sft_args.json (the arguments, dataset files made absolute) and martlet_run.json in `folder`."""
    saved = to_dict(args)
    for key in ("dataset", "val_dataset"):
        if isinstance(saved.get(key), list):
            saved[key] = _absolute_files(saved[key])
    write_json(os.path.join(folder, ARGS_FILE), saved)
    write_json(os.path.join(folder, RUN_INFO_FILE), info.to_dict())


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The run files a trainer writes into each checkpoint it saves (see `save_run_files`)."""

    args: SftArguments
    info: RunInfo

    def write(self, folder: str) -> None:
        save_run_files(folder, self.args, self.info)


def plot_history(log_history: list[dict[str, Any]], images_dir: str) -> list[str]:
    """PNG curves of train loss, eval loss and learning rate; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(images_dir, exist_ok=True)
    written = []
    for key, name in (("loss", "train_loss"), ("eval_loss", "eval_loss"), ("learning_rate", "train_learning_rate")):
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, color="#1f77b4")
        if key == "loss" and len(values) > 8:  # a smoothed line on top of the raw one
            k = max(2, len(values) // 10)
            smooth = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, color="#ff7f0e", label="smoothed")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        path = os.path.join(images_dir, f"{name}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
