"""Quality of the CAM-derived pixel labels: accuracy and coverage on the mosaic.

SPML's image-tag setting takes relation C from CAM pseudo labels, and its box setting from
box-CAM labels, so their accuracy (share of labelled pixels whose label is right) and coverage
(share of image pixels that get a label) bound what C can teach. Same data and features as
bench/train_quality.py's default table (the training split; frozen HED-VGG16 hypercolumn,
stride 4). Boxes are reported both as box-CAM labels and painted densely.

    python bench/cam_quality.py                 # default size
    python bench/cam_quality.py --cache /tmp/f.pt   # keep the features for a re-run
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from segsearch.spml.embedding import EmbeddingNet
from segsearch.spml.embedding import OUTPUT_STRIDE
from segsearch.trainer.cam import box_cam_labels, cam_pseudo_labels
from segsearch.trainer.config import TrainConfig
from segsearch.trainer.datasets import DataConfig, load_split
from segsearch.trainer.prepared import prepare_set, weak_annotations
from segsearch.trainer.sample import IGNORE_INDEX
from segsearch.spml.device import resolve_device
from segsearch.trainer.train import build_model_config
from segsearch.trainer.weak_labels import WeakLabelConfig

logger = logging.getLogger("cam_quality")


def load_prepared(config: TrainConfig, cache: Path | None):
    """The training split with tags and dense labels and cached backbone features."""
    if cache is not None and cache.exists():
        return torch.load(cache, weights_only=False)
    split = load_split(config.data, "train")
    model = EmbeddingNet(build_model_config(config, split.class_names)).to(resolve_device("auto")).eval()
    prepared = prepare_set(split.samples, len(split.class_names), WeakLabelConfig(kind="tags"), model,
                           edge_source="none")
    bundle = {"features": prepared.features, "tags": prepared.tags, "dense": prepared.dense_labels,
              "valid": prepared.valid_mask(), "background": split.background_class}
    if cache is not None:
        torch.save(bundle, cache)
    return bundle


def score(labels: torch.Tensor, dense: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    """(accuracy on pseudo-labelled pixels, coverage of the valid pixels with a known class)."""
    known = valid & (dense != IGNORE_INDEX)
    labelled = known & (labels != IGNORE_INDEX)
    accuracy = float((labels[labelled] == dense[labelled]).float().mean())
    return accuracy, float(labelled.sum()) / float(known.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=240)
    parser.add_argument("--cache", type=Path, default=None, help="feature cache file (.pt)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TrainConfig(data=DataConfig(image_size=args.image_size, num_train=args.num_train))
    started = time.perf_counter()
    bundle = load_prepared(config, args.cache)
    labels = cam_pseudo_labels(bundle["features"], bundle["tags"], bundle["background"], seed=config.seed,
                               valid=bundle["valid"])
    accuracy, coverage = score(labels, bundle["dense"], bundle["valid"])
    print(f"tags, CAM pseudo labels: accuracy {100 * accuracy:.1f}% at coverage {100 * coverage:.1f}% "
          f"({len(labels)} images, {time.perf_counter() - started:.0f} s)")
    split = load_split(config.data, "train")
    weak_config = WeakLabelConfig(kind="boxes", background_class=split.background_class, seed=config.seed)
    _, painted, boxes = weak_annotations(split.samples, len(split.class_names), weak_config)
    variants = [(f"box-CAM (in-box CAM >= 0.5, {w}x{w}-cell window)",
                 box_cam_labels(bundle["features"], bundle["tags"], boxes, bundle["background"], OUTPUT_STRIDE,
                                seed=config.seed, valid=bundle["valid"], window=w))
                for w in (1, config.box_cam_window)]
    for name, box_labels in (*variants, ("painted boxes", painted)):
        accuracy, coverage = score(box_labels, bundle["dense"], bundle["valid"])
        print(f"boxes, {name}: accuracy {100 * accuracy:.1f}% at coverage {100 * coverage:.1f}%")


if __name__ == "__main__":
    main()
