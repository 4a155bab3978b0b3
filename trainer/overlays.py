"""Pictures a person reads at a glance: image | ground truth | prediction, one row per image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from segsearch.spml.palette import class_colours, colourise


def overlay_sheet(
    images: list[np.ndarray], truths: list[np.ndarray], predictions: list[np.ndarray],
    class_names: list[str], out_path: Path, title: str = "",
) -> Path:
    """Rows of (image, ground truth, prediction); a legend of class colours at the bottom."""
    rows = [
        np.concatenate([image, colourise(truth), colourise(prediction)], axis=1)
        for image, truth, prediction in zip(images, truths, predictions)
    ]
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    legend_height = 18 * ((len(class_names) + 2) // 3) + 22
    canvas = Image.new("RGB", (sheet.width, sheet.height + legend_height), "white")
    canvas.paste(sheet, (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = class_colours()
    draw.text((4, sheet.height + 3), f"{title}  columns: image | ground truth | prediction", fill="black")
    column_width = sheet.width // 3
    for index, name in enumerate(class_names):
        x = 4 + (index % 3) * column_width
        y = sheet.height + 20 + 18 * (index // 3)
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(c) for c in colours[index]))
        draw.text((x + 16, y), name, fill="black")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path


def plot_confusion(confusion: np.ndarray, class_names: list[str], out_path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: ground truth) as a labelled heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(1.2 + 0.6 * len(class_names), 1.0 + 0.6 * len(class_names)))
    axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(class_names)), class_names, fontsize=8)
    for row in range(len(class_names)):
        for column in range(len(class_names)):
            axis.text(column, row, f"{rates[row, column]:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if rates[row, column] > 0.5 else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("ground truth")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return Path(out_path)
