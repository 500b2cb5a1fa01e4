"""What a run writes: its folder, the arguments, logging.jsonl, loss curves, checkpoint metadata."""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any

from martlet.args.base import to_dict

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
    import importlib.metadata as md

    versions = {}
    for name in ("martlet", "torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False, indent=2, default=str)
    os.replace(tmp, path)


def run_info(args: Any, spec: Any, template: Any, *, command: str) -> dict[str, Any]:
    """What reproduces the run and what later commands need (`--ckpt_dir` alone is enough)."""
    return {"command": command, "model_type": spec.model_type, "model_dir": spec.model_dir,
            "template_type": template.template_type, "system": template.system, "eot": template.eot,
            "stop_words": template.stop_words, "sft_type": getattr(args, "sft_type", None),
            "versions": library_versions()}


def _absolute_files(specs: list[str]) -> list[str]:
    """Dataset entries that are files, with absolute paths, so the saved arguments work from any folder."""
    out = []
    for spec in specs:
        path, sep, count = spec.rpartition("#") if "#" in spec else (spec, "", "")
        out.append(os.path.abspath(path) + sep + count if os.path.isfile(path) else spec)
    return out


def save_run_files(folder: str, args: Any, info: dict[str, Any]) -> None:
    saved = to_dict(args)
    for key in ("dataset", "val_dataset"):
        if isinstance(saved.get(key), list):
            saved[key] = _absolute_files(saved[key])
    write_json(os.path.join(folder, ARGS_FILE), saved)
    write_json(os.path.join(folder, RUN_INFO_FILE), info)


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
