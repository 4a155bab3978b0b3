"""Why does an embedding lose to a colour histogram on unseen data? Rank the segments of an
index built by `bench/retrieval_quality.py` with single descriptors and their combinations.

    python bench/retrieval_diagnosis.py --index bench/out/retrieval/runs/<run>/index

Every descriptor is a mean-pooled per-pixel map (so it could be a pixel embedding whose
segment prototype is the mean): each block of the untrained HED-VGG16 alone (raw, resampled
to stride 4 of the 320 px image the indexer embeds), blocks 3-5 concatenated raw (the first
models' hypercolumn), an 8x8x8 RGB histogram, the soft Lab code of `spml/colour.py` at 4 and
6 bins, and combinations (each part L2-normalised, then weighted). Queries are the
ground-truth regions of the QUERY mosaics; P@10 counts hits whose majority class is the
query's (`retrieval_scoring.py`), over the same indexed segments for every row.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval_quality import BENCH_DIR, BenchConfig, mask_means  # noqa: E402
from retrieval_scoring import colour_histogram  # noqa: E402

from segsearch.indexer.index_store import IndexStore  # noqa: E402
from segsearch.indexer.rle import decode_mask  # noqa: E402
from segsearch.spml.colour import lab_code  # noqa: E402
from segsearch.spml.embedding import _resample  # noqa: E402
from segsearch.spml.vgg import build_backbone  # noqa: E402

COMBINATIONS = {  # name -> ((descriptor, weight), ...)
    "lab6 + block3": (("lab6", 1.0), ("block3", 0.7)),
    "lab6 + block2": (("lab6", 1.0), ("block2", 0.7)),
    "lab6 + blocks3-5": (("lab6", 1.0), ("blocks345", 0.7)),
    "lab6 + block2 + block3": (("lab6", 1.0), ("block2", 0.5), ("block3", 0.5)),
    "rgb hist + blocks3-5": (("rgb512", 1.0), ("blocks345", 0.7)),
}


def image_descriptors(backbone, image: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """{descriptor: (S, C)} means over S masks (S, H, W) of one image (H, W, 3) uint8."""
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    out = {"rgb512": np.stack([colour_histogram(image[mask]) for mask in masks])}
    for bins in (4, 6):
        out[f"lab{bins}"] = mask_means(lab_code(tensor, bins)[0].numpy(), masks)
    resized = F.interpolate(tensor, size=(320, 320), mode="bilinear", align_corners=False)
    with torch.no_grad():
        blocks = [_resample(block, (80, 80))[0].numpy() for block in backbone(resized)]
    for number, block in enumerate(blocks, start=1):
        out[f"block{number}"] = mask_means(block, masks)
    out["blocks345"] = np.concatenate([out["block3"], out["block4"], out["block5"]], axis=1)
    return out


def collect(backbone, data_dir: Path, split: str, masks_by_image: dict[str, list]) -> dict[str, np.ndarray]:
    parts = defaultdict(list)
    for image_id, masks in sorted(masks_by_image.items()):
        image = np.asarray(Image.open(data_dir / split / image_id).convert("RGB"))
        for name, values in image_descriptors(backbone, image, np.stack(masks)).items():
            parts[name].append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def precision_at_10(queries: np.ndarray, candidates: np.ndarray, query_class, candidate_class) -> float:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    top = np.argsort(-(unit(queries) @ unit(candidates).T), axis=1)[:, :10]
    return float((candidate_class[top] == query_class[:, None]).mean())


def combine(descriptors: dict[str, np.ndarray], parts) -> np.ndarray:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    return np.concatenate([weight * unit(descriptors[name]) for name, weight in parts], axis=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="an index that retrieval_quality.py built")
    p.add_argument("--data", default=str(BENCH_DIR / "out" / "retrieval" / BenchConfig().data_name))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    data_dir = Path(args.data)
    candidates, candidate_class = defaultdict(list), []
    with IndexStore.open(args.index) as store:
        for record in store.iter_images():
            truth = np.asarray(Image.open(data_dir / "index_gt" / record.image_id))
            for segment_id in record.segment_ids:
                segment = store.get_segment(segment_id)
                mask = decode_mask(segment.mask_rle, segment.mask_shape)
                candidates[record.image_id].append(mask)
                candidate_class.append(np.bincount(truth[mask], minlength=256).argmax())
    queries, query_class = defaultdict(list), []
    for path in sorted((data_dir / "query_gt").iterdir()):
        truth = np.asarray(Image.open(path))
        for class_index in np.unique(truth):
            queries[path.name].append(truth == class_index)
            query_class.append(class_index)
    backbone = build_backbone("vgg16", True, num_blocks=5).eval()
    candidate_descriptors = collect(backbone, data_dir, "index", candidates)
    query_descriptors = collect(backbone, data_dir, "query", queries)
    classes = (np.asarray(query_class), np.asarray(candidate_class))
    print(f"{sum(map(len, candidates.values()))} indexed segments, {len(query_class)} query regions\n")
    print(f"{'descriptor':28} P@10")
    for name in sorted(candidate_descriptors):
        print(f"{name:28} {precision_at_10(query_descriptors[name], candidate_descriptors[name], *classes):.3f}")
    for name, parts in COMBINATIONS.items():
        score = precision_at_10(combine(query_descriptors, parts), combine(candidate_descriptors, parts), *classes)
        print(f"{name:28} {score:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
