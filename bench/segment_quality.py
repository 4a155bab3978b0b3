"""Segment quality of the region hierarchy vs SLIC on the built-in mosaic test split (issue 12).

For every test image (trainer/mosaic.py, `load_split(DataConfig(), "test")`: 60 images of
128 px, 2..5 textured regions each) it scores

- ours, fine: the k-means segments after the tiny-segment rule, refined below the stride and
  snapped to the image's contours (`spml.snap`);
- ours, region level: the default cut (`SegmenterConfig.region_height`);
- ours, cut at the ground-truth count;
- ours without snapping (`snap_size=0`): fine level, region level, cut at the true count;
- before: the fine level of `--before-commit` (nearest upsampling of the stride-4 map);
- SLIC (`skimage.segmentation.slic`, default compactness, RGB) at the same counts as each of
  ours, per image, on the same images (`slic_labels` raises its request until it returns
  about as many segments);

by mean best-match IoU (each ground-truth region's best IoU with any predicted region,
averaged over all regions of all images) and boundary F (boundary pixels: a pixel whose
right or lower neighbour has another label; a predicted boundary pixel is matched when a
ground-truth one lies within `--tolerance` px, and vice versa; precision and recall pooled
over images). The count columns say how many regions each method really produced.

The defaults (contour weight, size exponent, region height) are chosen on the *train* split
with `--tune` (a sweep over the three, scored by best-match IoU at the region level, ties to
boundary F), never on the test images. Costs: milliseconds per image for the Segmenter at
`--before-commit` (loaded from git), ours and ours without snapping, on the same batches,
interleaved.

Usage: python bench/segment_quality.py [--checkpoint bench/out/seg-model/checkpoint.pt]
       [--tune] [--num-test 60] [--overlays 4] [--out bench/out/segment_quality]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage.segmentation import slic

from segsearch.spml.checkpoint import load_checkpoint
from segsearch.spml.config import SegmenterConfig
from segsearch.spml.hierarchy import cut_by_count, cut_by_height
from segsearch.spml.palette import IGNORE_INDEX
from segsearch.spml.segmenter import Segmenter, resize_for_embedding
from segsearch.trainer.datasets import DataConfig, load_split

log = logging.getLogger("bench.segment_quality")
ROOT = Path(__file__).resolve().parents[1]


# ---- metrics -------------------------------------------------------------------------------

def best_match_ious(truth: np.ndarray, predicted: np.ndarray) -> list[float]:
    """For each ground-truth region of `truth` `(H, W)` (IGNORE_INDEX skipped), its best IoU
    with any region of `predicted` `(H, W)` (-1 = no region)."""
    out = []
    pred_ids = np.unique(predicted[predicted >= 0])
    for region in np.unique(truth[truth != IGNORE_INDEX]):
        inside = truth == region
        best = 0.0
        for pred in pred_ids:
            mask = predicted == pred
            union = np.logical_or(inside, mask).sum()
            best = max(best, float(np.logical_and(inside, mask).sum()) / float(union))
        out.append(best)
    return out


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """`(H, W)` bool: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


@dataclass
class BoundaryCounts:
    """Pooled over images: matched / all predicted boundary pixels, matched / all true ones."""

    matched_pred: int = 0
    pred: int = 0
    matched_true: int = 0
    true: int = 0

    def add(self, truth: np.ndarray, predicted: np.ndarray, tolerance: float) -> None:
        true_edge, pred_edge = boundary_map(truth), boundary_map(predicted)
        to_true = ndimage.distance_transform_edt(~true_edge) if true_edge.any() else np.full(truth.shape, np.inf)
        to_pred = ndimage.distance_transform_edt(~pred_edge) if pred_edge.any() else np.full(truth.shape, np.inf)
        self.matched_pred += int((to_true[pred_edge] <= tolerance).sum())
        self.pred += int(pred_edge.sum())
        self.matched_true += int((to_pred[true_edge] <= tolerance).sum())
        self.true += int(true_edge.sum())

    @property
    def f_measure(self) -> float:
        precision = self.matched_pred / max(self.pred, 1)
        recall = self.matched_true / max(self.true, 1)
        return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@dataclass
class Score:
    """One method over the whole split."""

    ious: list[float] = field(default_factory=list)
    boundary: BoundaryCounts = field(default_factory=BoundaryCounts)
    counts: list[int] = field(default_factory=list)

    def add(self, truth: np.ndarray, predicted: np.ndarray, tolerance: float) -> None:
        self.ious.extend(best_match_ious(truth, predicted))
        self.boundary.add(truth, predicted, tolerance)
        self.counts.append(int(np.unique(predicted[predicted >= 0]).size))

    def row(self, name: str) -> str:
        return (f"| {name} | {np.mean(self.counts):.1f} | {np.mean(self.ious):.3f} | "
                f"{self.boundary.f_measure:.3f} |")


SLIC_ASKS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)


def slic_labels(image: np.ndarray, count: int) -> np.ndarray:
    """SLIC with about `count` segments: it usually returns fewer than asked, so the request
    is raised step by step (`SLIC_ASKS`) until it returns at least `count`; the try whose
    count is closest wins (ties: the earlier)."""
    best = None
    for factor in SLIC_ASKS:
        labels = slic(image, n_segments=max(round(count * factor), 1), start_label=0)
        found = int(np.unique(labels).size)
        if best is None or abs(found - count) < abs(best[0] - count):
            best = (found, labels)
        if found >= count:
            break
    return best[1]


# ---- segmenting ----------------------------------------------------------------------------

def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def segment_all(segmenter: Segmenter, images: list[np.ndarray], batch: int):
    """Every image's `ImageSegments` and the seconds spent, batch by batch."""
    results, seconds = [], 0.0
    for chunk in batches(images, batch):
        start = time.perf_counter()
        results.extend(segmenter(chunk))
        seconds += time.perf_counter() - start
    return results, seconds


def cluster_all(segmenter: Segmenter, images: list[np.ndarray], batch: int):
    """The device half once per image (re-used across hierarchy settings)."""
    return [segmenter.cluster(chunk) for chunk in batches(images, batch)]


def tune(segmenter: Segmenter, images, truths, batch: int, weights, exponents, heights, tolerance):
    """Sweep contour weight x size exponent x region height on the train split; returns the
    best (weight, exponent, height) by best-match IoU at the region level (ties: boundary F)
    and the table rows (also the IoU of the cut at the true count, which needs no height)."""
    clustered = cluster_all(segmenter, images, batch)
    rows, best = [], None
    for weight in weights:
        for exponent in exponents:
            config = dataclasses.replace(segmenter.config, contour_weight=weight, merge_size_exponent=exponent)
            results = [r for c in clustered for r in Segmenter(segmenter.model, None, config).finish(c)]
            at_truth = Score()
            for result, truth in zip(results, truths):
                count = int(np.unique(truth[truth != IGNORE_INDEX]).size)
                at_truth.add(truth, np.append(cut_by_count(result.tree, count), -1)[result.label_map], tolerance)
            for height in heights:
                score = Score()
                for result, truth in zip(results, truths):
                    score.add(truth, np.append(cut_by_height(result.tree, height), -1)[result.label_map], tolerance)
                key = (round(float(np.mean(score.ious)), 3), score.boundary.f_measure)
                rows.append((weight, exponent, height, np.mean(score.counts), *key, np.mean(at_truth.ious),
                             at_truth.boundary.f_measure))
                if best is None or key > best[0]:
                    best = (key, weight, exponent, height)
    return best[1:], rows


def before_segmenter_class(commit: str):
    """`Segmenter` as it was at `commit` (spml/segmenter.py from git, its imports unchanged)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:spml/segmenter.py"],
                            check=True, capture_output=True, text=True).stdout
    path = ROOT / "bench" / "out" / f"segmenter_{commit}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"segmenter_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Segmenter


def costs(before: Segmenter, ours: Segmenter, unsnapped: Segmenter, images, batch: int,
          repeats: int) -> dict[str, float]:
    """ms per image, best of `repeats`, before, ours and ours without snapping interleaved on
    the same batches; plus the parts of ours: the forward pass with and without the edge map."""
    chunk = images[:batch]
    timings = {"before": [], "ours": [], "unsnapped": [], "embed": [], "edges": []}
    resized = [resize_for_embedding(im, ours.config.embed_size) for im in chunk]
    pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        blocks = ours.model.backbone(pixels)
    before(chunk), ours(chunk)  # warm-up

    def edges_only():
        with torch.inference_mode():
            ours._edges(pixels, blocks)

    for _ in range(repeats):
        for name, call in (("before", lambda: before(chunk)), ("ours", lambda: ours(chunk)),
                           ("unsnapped", lambda: unsnapped(chunk)), ("embed", lambda: ours.embed(resized)), ("edges", edges_only)):
            start = time.perf_counter()
            call()
            timings[name].append((time.perf_counter() - start) * 1000 / len(chunk))
    return {name: min(values) for name, values in timings.items()}


# ---- pictures ------------------------------------------------------------------------------

def paint(image: np.ndarray, labels: np.ndarray, scale: int) -> np.ndarray:
    """Each region in its mean colour, borders in red, enlarged `scale`x (nearest) so stair
    steps stay visible."""
    big_image = np.kron(image, np.ones((scale, scale, 1), dtype=np.uint8))
    big = np.kron(labels, np.ones((scale, scale), dtype=labels.dtype))
    out = big_image.astype(np.float64) * 0.5
    for region in np.unique(big):
        mask = big == region
        out[mask] += 0.5 * big_image[mask].mean(axis=0)
    out = out.astype(np.uint8)
    out[boundary_map(big)] = (255, 0, 0)
    return out


def write_overlay(path: Path, rows: list[list[np.ndarray]]) -> None:
    gap = 4
    height = sum(r[0].shape[0] for r in rows) + gap * (len(rows) - 1)
    width = sum(p.shape[1] for p in rows[0]) + gap * (len(rows[0]) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    y = 0
    for row in rows:
        x = 0
        for panel in row:
            canvas[y:y + panel.shape[0], x:x + panel.shape[1]] = panel
            x += panel.shape[1] + gap
        y += row[0].shape[0] + gap
    Image.fromarray(canvas).save(path)


# ---- main ----------------------------------------------------------------------------------

def unseen_mosaics(folder: Path, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first `count` query mosaics of a retrieval benchmark data folder: images (H, W, 3)
    uint8 and ground truths (H, W) int64."""
    paths = sorted((folder / "query").glob("*.png"))[:count]
    if not paths:
        raise SystemExit(f"no query/*.png in {folder}; run bench/retrieval_quality.py first")
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    truths = [np.asarray(Image.open(folder / "query_gt" / path.name)).astype(np.int64) for path in paths]
    return images, truths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="bench/out/seg-model/checkpoint.pt")
    parser.add_argument("--num-test", type=int, default=60)
    parser.add_argument("--num-tune", type=int, default=40, help="train images for --tune")
    parser.add_argument("--tune", action="store_true", help="sweep contour weight x region height on train")
    parser.add_argument("--weights", default="0,1,2,3")
    parser.add_argument("--exponents", default="0,0.25,0.5")
    parser.add_argument("--heights", default="0.2,0.3,0.4,0.5,0.6,0.7,0.75,0.8,0.9,1.0,1.2,1.5")
    parser.add_argument("--tolerance", type=float, default=2.0)
    parser.add_argument("--image-size", type=int, default=DataConfig.image_size,
                        help="side of the test mosaics (the model was trained at 128)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before-commit", default="a697869")
    parser.add_argument("--overlays", type=int, default=4)
    parser.add_argument("--out", default="bench/out/segment_quality")
    parser.add_argument("--unseen", metavar="DIR", default="",
                        help="score the query mosaics of bench/retrieval_quality.py's data folder DIR "
                             "(query/*.png, query_gt/*.png: pictures the model never saw) instead of the "
                             "built-in test mosaics")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    checkpoint = load_checkpoint(args.checkpoint)
    model = checkpoint.build_model().eval()
    config = SegmenterConfig()
    ours = Segmenter(model, checkpoint.label_bank, config)

    if args.tune:
        train = load_split(DataConfig(num_train=args.num_tune), "train").samples[:args.num_tune]
        floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
        (weight, exponent, height), rows = tune(ours, [s.image for s in train], [s.mask for s in train], args.batch,
                                                floats(args.weights), floats(args.exponents), floats(args.heights),
                                                args.tolerance)
        print(f"\nTuning on {len(train)} train images:\n")
        print("| contour weight | size exponent | region height | regions | best-match IoU | boundary F "
              "| IoU at true count | F at true count |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
        for w, p, t, count, iou, f, iou_truth, f_truth in rows:
            print(f"| {w} | {p} | {t} | {count:.1f} | {iou:.3f} | {f:.3f} | {iou_truth:.3f} | {f_truth:.3f} |")
        print(f"\nbest: contour_weight={weight} merge_size_exponent={exponent} region_height={height} (defaults "
              f"in use: {config.contour_weight}, {config.merge_size_exponent}, {config.region_height})")

    if args.unseen:
        images, truths = unseen_mosaics(Path(args.unseen), args.num_test)
    else:
        test = load_split(DataConfig(image_size=args.image_size, num_test=args.num_test), "test").samples
        images, truths = [s.image for s in test], [s.mask for s in test]
    log.info("segmenting %d test images", len(images))
    results, seconds = segment_all(ours, images, args.batch)
    unsnapped = Segmenter(model, checkpoint.label_bank, dataclasses.replace(config, snap_size=0))
    plain, _ = segment_all(unsnapped, images, args.batch)

    before_class = before_segmenter_class(args.before_commit)
    old_four = before_class(model, checkpoint.label_bank, dataclasses.replace(config, grid=(2, 2)))
    four, _ = segment_all(old_four, images, args.batch)  # what Segment(num_segments=4) did before
    before = before_class(model, checkpoint.label_bank, config)
    before_results, _ = segment_all(before, images, args.batch)

    scores = {name: Score() for name in ("fine", "regions", "cut", "before", "slic_fine", "slic_regions",
                                         "slic_cut", "cut_unsnapped", "fine_unsnapped", "regions_unsnapped", "before_4", "cut_4", "slic_4")}
    for image, truth, result, old, old_4, first in zip(images, truths, results, plain, four, before_results):
        scores["before_4"].add(truth, old_4.label_map, args.tolerance)
        scores["cut_4"].add(truth, np.append(cut_by_count(result.tree, 4), -1)[result.label_map], args.tolerance)
        scores["slic_4"].add(truth, slic_labels(image, 4), args.tolerance)
        true_count = int(np.unique(truth[truth != IGNORE_INDEX]).size)
        cut = np.append(cut_by_count(result.tree, true_count), -1)[result.label_map]
        cut_old = np.append(cut_by_count(old.tree, true_count), -1)[old.label_map]
        for name, predicted in (("fine", result.label_map), ("regions", result.regions.label_map),
                                ("cut", cut), ("before", first.label_map), ("cut_unsnapped", cut_old),
                                ("fine_unsnapped", old.label_map), ("regions_unsnapped", old.regions.label_map)):
            scores[name].add(truth, predicted, args.tolerance)
        for name, source in (("slic_fine", "fine"), ("slic_regions", "regions"), ("slic_cut", "cut")):
            scores[name].add(truth, slic_labels(image, scores[source].counts[-1]), args.tolerance)

    slic_seconds = time.perf_counter()
    for image, count in zip(images, scores["regions"].counts):
        slic_labels(image, count)
    slic_ms = (time.perf_counter() - slic_seconds) * 1000 / len(images)

    cost = costs(before, ours, unsnapped, images, args.batch, args.repeats)

    print(f"\n{len(images)} test images of {images[0].shape[1]}x{images[0].shape[0]} px, {len(scores['regions'].ious)} ground-truth regions, "
          f"tolerance {args.tolerance:g} px; config {config}\n")
    print("| segments | regions per image | best-match IoU | boundary F (2 px) |\n|---|---:|---:|---:|")
    for name, title in (("before", "before: k-means fine level, nearest upsampling (today's default)"),
                        ("fine_unsnapped", "ours without snapping: fine level (refined borders)"),
                        ("fine", "**ours: fine level (refined, snapped to contours)**"),
                        ("slic_fine", "SLIC at the fine level's count"),
                        ("regions_unsnapped", "ours without snapping: region level"),
                        ("regions", "**ours: region level (default)**"),
                        ("slic_regions", "SLIC at the region level's count"),
                        ("cut", "ours: cut at the ground-truth count"),
                        ("cut_unsnapped", "ours without snapping: cut at the ground-truth count"),
                        ("slic_cut", "SLIC at the ground-truth count"),
                        ("before_4", "before: Segment asked for 4 (k-means 2x2 grid)"),
                        ("cut_4", "ours: Segment asked for 4 (cut at 4)"),
                        ("slic_4", "SLIC at 4")):
        print(scores[name].row(title))
    print(f"\nms per image (batch {args.batch}, best of {args.repeats}, 2 shared cores): "
          f"before {cost['before']:.0f}, ours {cost['ours']:.0f} "
          f"(throughput ratio {cost['before'] / cost['ours']:.2f}x), ours without snapping {cost['unsnapped']:.0f} "
          f"(snapping costs {cost['ours'] - cost['unsnapped']:.0f}); forward pass {cost['embed']:.0f}, "
          f"edge map alone {cost['edges']:.1f}; SLIC {slic_ms:.1f}; "
          f"whole split ours {seconds * 1000 / len(images):.0f}")

    overlays, scale = [], max(1, 384 // args.image_size)  # small mosaics enlarged: stair steps visible
    for image, result, old in list(zip(images, results, plain))[:args.overlays]:
        overlays.append([np.kron(image, np.ones((scale, scale, 1), np.uint8)), paint(image, old.label_map, scale),
                         paint(image, result.label_map, scale), paint(image, result.regions.label_map, scale)])
    if overlays:
        path = out / "overlay.png"
        write_overlay(path, overlays)
        print(f"\noverlay (image | ours without snapping: fine | ours: fine, snapped | ours: regions): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
