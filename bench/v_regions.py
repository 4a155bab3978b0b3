"""Relation V's regions on the training split: how many per image, and how often a pixel's V
negatives share its ground-truth class.

Why: V pushes a pixel away from the other regions of its image. A negative region whose
majority ground-truth class is the pixel's own pushes apart parts of one texture, which is
the cost the issue measured for the grid-seeded regions ("a third of a pixel's V
negatives"). Counted at the embedding resolution (stride 4), where V works, on the same HED
edges as bench/train_quality.py (read from the feature cache when present).

    python bench/v_regions.py                     # default table's training split (240 images)
    python bench/v_regions.py --methods grid,hierarchy --thresholds 0.3,0.5,0.7
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from segsearch.trainer.datasets import DataConfig, load_split
from segsearch.trainer.feature_cache import cached, key_for
from segsearch.trainer.lowlevel import REGION_METHODS, region_map
from segsearch.trainer.prepared import compute_edges, sample_centres

logger = logging.getLogger(__name__)


def own_class_negative_share(regions: np.ndarray, classes: np.ndarray) -> tuple[float, int]:
    """`(h, w)` regions and ground-truth classes -> (share of (pixel, other region) pairs whose
    region's majority class is the pixel's class, number of such pairs)."""
    ids = np.unique(regions)
    majority = {r: np.bincount(classes[regions == r]).argmax() for r in ids}
    same = pairs = 0
    for r in ids:
        pixels = classes[regions == r]
        for other in ids:
            if other != r:
                same += int((pixels == majority[other]).sum())
                pairs += pixels.size
    return (same / pairs if pairs else 0.0), pairs


def measure(edges: np.ndarray, masks: torch.Tensor, method: str, threshold: float, cap: int) -> dict:
    """Regions per image (mean, min, max) and the own-class share of V negatives over the set."""
    maps = torch.from_numpy(np.stack([region_map(e, method, cap, threshold) for e in edges]).astype(np.int64))
    small_regions = sample_centres(maps).numpy()
    small_classes = sample_centres(masks).numpy()
    counts, same, pairs = [], 0.0, 0
    for regions, classes in zip(small_regions, small_classes):
        _, regions = np.unique(regions, return_inverse=True)
        regions = regions.reshape(classes.shape)
        counts.append(int(regions.max()) + 1)
        share, n = own_class_negative_share(regions, classes.astype(np.int64))
        same, pairs = same + share * n, pairs + n
    return dict(mean=float(np.mean(counts)), min=min(counts), max=max(counts),
                own_class_negatives=same / max(pairs, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(REGION_METHODS))
    parser.add_argument("--thresholds", default="0.5", help="hierarchy cut heights, comma-separated")
    parser.add_argument("--regions", type=int, default=16, help="grid: cells; hierarchy: the cap")
    parser.add_argument("--edge-source", default="hed", choices=("hed", "sobel"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    split = load_split(DataConfig(), "train")
    images = torch.from_numpy(np.stack([s.image for s in split.samples])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([s.mask for s in split.samples])).long()
    edges = cached(key_for("edges", images, args.edge_source),
                   lambda: torch.from_numpy(compute_edges(images, args.edge_source, 16, True))).numpy()
    print("| regions | per image (mean, min-max) | V negatives of the pixel's own class |")
    print("|---|---|---|")
    for method in args.methods.split(","):
        for threshold in ([float(t) for t in args.thresholds.split(",")] if method == "hierarchy" else [0.0]):
            row = measure(edges, masks, method, threshold, args.regions)
            name = f"{method} ({args.regions})" if method == "grid" else \
                f"hierarchy, cut {threshold}, at most {args.regions}"
            print(f"| {name} | {row['mean']:.1f} ({row['min']}-{row['max']}) | "
                  f"{100 * row['own_class_negatives']:.1f}% |")


if __name__ == "__main__":
    main()
