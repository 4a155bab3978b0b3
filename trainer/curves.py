"""Loss curves: train_log.jsonl -> a PNG with one line per loss term (smoothed)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_loss_curves(metrics_path: Path, out_path: Path, smoothing: int = 10) -> Path:
    rows = read_metrics(metrics_path)
    terms = [k for k in rows[0] if k not in ("step", "lr")] if rows else []
    figure, axis = plt.subplots(figsize=(7, 4))
    steps = np.array([row["step"] for row in rows])
    for term in terms:
        values = np.array([row.get(term, np.nan) for row in rows], dtype=float)
        kernel = np.ones(min(smoothing, len(values))) / max(min(smoothing, len(values)), 1)
        smoothed = np.convolve(values, kernel, mode="valid") if len(values) else values
        axis.plot(steps[len(steps) - len(smoothed):], smoothed, label=term,
                  linewidth=2.0 if term == "loss" else 1.0)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (moving average)")
    axis.set_title(Path(metrics_path).parent.name)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path
