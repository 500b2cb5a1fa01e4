"""The results of `martlet eval`: a table (suite x model), a JSON file and a PNG bar chart."""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

Scores = dict[str, dict[str, dict[str, Any]]]  # model -> suite -> {accuracy, correct, total}


def format_table(scores: Scores) -> str:
    """One row per suite, one column per model: `accuracy (correct/total)`."""
    models = list(scores)
    suites = list(dict.fromkeys(suite for by_suite in scores.values() for suite in by_suite))
    cells = [["suite", *models]]
    for suite in suites:
        row = [suite]
        for model in models:
            score = scores[model].get(suite)
            row.append(f"{score['accuracy']:.3f} ({score['correct']}/{score['total']})" if score else "-")
        cells.append(row)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def result_stem(output_dir: str) -> str:
    """<output_dir>/eval-<time>, a name no earlier run of this folder used."""
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, f"eval-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    candidate, n = stem, 1
    while os.path.exists(candidate + ".json"):
        candidate, n = f"{stem}-{n}", n + 1
    return candidate


def write_json(path: str, payload: dict[str, Any]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, ensure_ascii=False, indent=2)
    return path


def plot_scores(path: str, scores: Scores) -> str:
    """A grouped bar chart of accuracy: suites along x, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(scores)
    suites = list(dict.fromkeys(suite for by_suite in scores.values() for suite in by_suite))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(suites) + 1), 3.6))
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(suites))]
        values = [scores[model].get(suite, {}).get("accuracy", 0.0) for suite in suites]
        bars = ax.bar(xs, values, width, label=model)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(suites)), suites)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
