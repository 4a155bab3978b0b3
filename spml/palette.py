"""Class colours for the pictures the trainer and the service draw (overlays, query sheets),
so that one class has one colour everywhere."""
from __future__ import annotations

import imgviz
import numpy as np

IGNORE_INDEX = 255  # the label value of "unknown" pixels, drawn black (the trainer's convention too)


def class_colours() -> np.ndarray:
    """(256, 3) uint8: imgviz's palette shifted by one, so that class 0 is not black (black
    means "ignore" in our pictures)."""
    return imgviz.label_colormap()[1:]


def colourise(labels: np.ndarray, image: np.ndarray | None = None, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) class ids (`ignore_index` drawn black) -> (H, W, 3) uint8, blended 60/40 over
    `image` when one is given."""
    colours = class_colours()
    safe = np.where(labels == ignore_index, 0, labels)
    rgb = colours[safe % len(colours)].copy()
    if image is not None:
        rgb = (0.6 * rgb + 0.4 * image).astype(np.uint8)
    rgb[labels == ignore_index] = 0
    return rgb
