"""Indexer benchmarks in one run, each printed as a markdown table with ratios to its baseline.

Parts (``--parts``, default all):
- ``pipeline``: indexing throughput (images/s at 320x320) of the batched, overlapped pipeline
  (``indexer.pipeline.index_corpus``) vs a naive one-image-at-a-time loop (decode, segment,
  commit, one image after the other, same model and stages) vs the embedding forward pass
  alone on the same images already in memory (the bound), with the seconds per stage
  (goal: pipeline ≥ 90% of forward-only images/s; ≥ 2x the naive loop where the other
  stages are not negligible beside the forward), and the same pipeline storing fine segments
  only (`SegmenterConfig.regions=False`, `segsearch index --fine-only`): the cost of the
  region hierarchy (goal: with it ≥ 0.8× the images/s without);
- ``kmeans``: batched torch spherical k-means vs ``faiss.Kmeans(spherical=True)`` called per
  image, same k and iterations (bench/kmeans_speed.py; goal: faster, objective within 1%);
- ``search``: recall@10 and queries/s of the chosen vector index types vs exact search at
  100k and 1M clustered prototypes (bench/search_speed.py; goal: recall@10 ≥ 0.95 at ≥ 10×
  the exact queries/s at 1M).

Each part's options carry its name as a prefix (``--kmeans-batch``, ``--search-sizes``);
``--threads`` sets torch's and faiss's CPU threads for both (default: all cores).

The pipeline part indexes ``--pipeline-images`` JPEG files made from random crops of
scikit-image's bundled photos, resized to 320x320. Without ``--pipeline-checkpoint`` it builds
a checkpoint of the default architecture (HED-pretrained VGG16 backbone, untrained head,
a random label bank): speed does not depend on training.

Usage: python bench/index_speed.py [--parts pipeline kmeans search] [--threads 2]
       [--pipeline-images 64] [--search-sizes 100000,1000000] [--kmeans-batch 16] ...
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import kmeans_speed  # bench/ is the script directory
import numpy as np
import search_speed
import torch
from PIL import Image
from segsearch.indexer.corpus import read_corpus
from segsearch.indexer.decode import decode_bytes
from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.pipeline import IndexConfig, image_records, index_corpus
from segsearch.spml.segmenter import Segmenter, SegmenterConfig, StageTimes, resize_for_embedding
from segsearch.spml.checkpoint import Checkpoint, LabelBank, load_checkpoint, save_checkpoint
from segsearch.spml.embedding import EmbeddingNet, ModelConfig

log = logging.getLogger("bench.index_speed")

PARTS = ("pipeline", "kmeans", "search")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
STAGES = ("decode", "embed", "segment", "label", "store", "wait_decode")
GOAL_OF_FORWARD = 0.90
GOAL_OVER_NAIVE = 2.0
GOAL_HIERARCHY = 0.8  # indexing with the region hierarchy vs fine segments only


@dataclass
class Throughput:
    method: str
    images: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.images / self.seconds


# ---- pipeline throughput -------------------------------------------------------------------

def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline-images", type=int, default=64, help="corpus size")
    parser.add_argument("--pipeline-size", type=int, default=320, help="side of the square images")
    parser.add_argument("--pipeline-batch", type=int, default=IndexConfig().batch_size,
                        help="images per forward pass (pipeline and forward-only)")
    parser.add_argument("--pipeline-checkpoint", default="", help="a checkpoint (default: build one)")
    parser.add_argument("--pipeline-backbone", default="vgg16", choices=("vgg16", "small"),
                        help="architecture of the built checkpoint (small: a quick smoke run)")
    parser.add_argument("--pipeline-device", default="cuda" if torch.cuda.is_available() else "cpu")


def write_corpus(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` distinct `size`x`size` JPEGs: random square crops (40-100% of the short side,
    random place, random mirror) of scikit-image's bundled photos."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB")) for name in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        photo = photos[n % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = photo[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR)
        image.save(folder / f"img{n:05d}.jpg", quality=90)


def build_checkpoint(path: Path, backbone: str) -> None:
    """Default architecture with a random head and a random 2000-prototype, 21-class label bank."""
    torch.manual_seed(0)
    classes = [f"class{i}" for i in range(21)]
    config = ModelConfig(backbone=backbone, pretrained=backbone == "vgg16", class_names=classes)
    model = EmbeddingNet(config)
    bank = LabelBank(torch.nn.functional.normalize(torch.randn(2000, config.embedding_dim), dim=1),
                     torch.randint(0, len(classes), (2000,)))
    save_checkpoint(Checkpoint(config, model.state_dict(), bank), path)


def forward_only(model: EmbeddingNet, images: list[np.ndarray], batch: int,
                 device: torch.device) -> Throughput:
    """The bound: embedding forward passes over images already decoded and resized in memory."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            inputs = torch.from_numpy(np.stack(images[i:i + batch])).to(device)
            model(inputs.permute(0, 3, 1, 2).float())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return Throughput(f"forward only (batch {batch})", len(images), time.perf_counter() - start)


def naive_loop(corpus: Path, checkpoint_path: Path, out: Path, config: IndexConfig) -> Throughput:
    """One image at a time, nothing overlapped: decode, segment (batch of 1), commit, next.

    Same model, segmenter settings, records and store as the pipeline; it only lacks the
    batching, the decode threads and the chunked commits.
    """
    start = time.perf_counter()
    checkpoint = load_checkpoint(checkpoint_path)
    device = torch.device(config.device)
    segmenter = Segmenter(checkpoint.build_model().to(device), checkpoint.label_bank, config.segmenter)
    version = checkpoint.model_version
    times = StageTimes()
    store = IndexStore.create(out, version, checkpoint.config.output_dim, config.index_type,
                              save_every=config.save_every)
    try:
        for item in read_corpus(corpus):
            with times.measure("decode"):
                # Same steps as the pipeline's decode_file; raises on failure (our own JPEGs).
                decoded = decode_bytes(Path(item.uri).read_bytes(), config.decode)
                resized = resize_for_embedding(decoded.pixels, config.segmenter.embed_size)
            segments = segmenter([decoded.pixels], resized=[resized], timings=times)[0]
            with times.measure("store"):
                store.add_images([image_records(item.image_id, item.uri, decoded, segments, version)])
        images = store.meta.num_images
    finally:
        store.close()
    return Throughput("naive loop (1 image at a time)", images, time.perf_counter() - start, times.as_dict())


def run_pipeline(args: argparse.Namespace) -> None:
    device = torch.device(args.pipeline_device)
    segmenter = SegmenterConfig(embed_size=args.pipeline_size)
    config = IndexConfig(batch_size=args.pipeline_batch, segmenter=segmenter, device=str(device),
                         progress=False)
    with tempfile.TemporaryDirectory(prefix="segsearch-bench-") as tmp:
        root = Path(tmp)
        write_corpus(root / "corpus", args.pipeline_images, args.pipeline_size)
        checkpoint_path = Path(args.pipeline_checkpoint) if args.pipeline_checkpoint else root / "model.pt"
        if not args.pipeline_checkpoint:
            build_checkpoint(checkpoint_path, args.pipeline_backbone)
        model = load_checkpoint(checkpoint_path).build_model().to(device)
        images = [resize_for_embedding(np.asarray(Image.open(item.uri).convert("RGB")), args.pipeline_size)
                  for item in read_corpus(root / "corpus")]
        forward_only(model, images[:args.pipeline_batch], args.pipeline_batch, device)  # warm-up
        first = forward_only(model, images, args.pipeline_batch, device)
        fine_only = timed_pipeline(root / "corpus", checkpoint_path, root / "fine-only",
                                   replace(config, segmenter=replace(segmenter, regions=False)),
                                   "pipeline, fine segments only (no hierarchy)")
        pipeline = timed_pipeline(root / "corpus", checkpoint_path, root / "pipeline", config,
                                  f"pipeline (batch {config.batch_size}, overlapped, with the hierarchy)")
        naive = naive_loop(root / "corpus", checkpoint_path, root / "naive", config)
        # Forward-only again, after: load drifts on a shared machine; the better of the two
        # runs is the bound (the stricter test of the 90% goal).
        second = forward_only(model, images, args.pipeline_batch, device)
    bound = first if first.seconds <= second.seconds else second
    print_pipeline_table([bound, pipeline, fine_only, naive], args, device)


def timed_pipeline(corpus: Path, checkpoint_path: Path, out: Path, config: IndexConfig, method: str) -> Throughput:
    start = time.perf_counter()
    summary = index_corpus(corpus, checkpoint_path, out, config)
    return Throughput(method, summary.images_indexed, time.perf_counter() - start, summary.stage_seconds)


def print_pipeline_table(rows: list[Throughput], args: argparse.Namespace, device: torch.device) -> None:
    bound, pipeline, fine_only, naive = rows
    side = args.pipeline_size
    print(f"\n### Indexing throughput: {pipeline.images} images of {side}x{side}, "
          f"{args.pipeline_backbone if not args.pipeline_checkpoint else args.pipeline_checkpoint} model, "
          f"{device.type}, {torch.get_num_threads()} torch threads\n")
    print("| method | images | seconds | images/s | vs forward only | vs naive loop |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row.method} | {row.images} | {row.seconds:.1f} | {row.per_second:.2f} "
              f"| {row.per_second / bound.per_second:.2f} | {row.per_second / naive.per_second:.2f}× |")
    print("\nseconds per stage. Naive loop: one thread, so the stages and `other` (model load, index "
          "creation) add up to its wall time. Pipeline: summed over its threads (decode pool, main thread: "
          "embed + k-means, finisher thread: tiny-segment rule, masks, labels, store), so they may add up to "
          "more than its wall time; `wait_decode` is how long the main thread waited for decoded images.\n")
    print("| method | wall s | " + " | ".join(STAGES) + " | other |")
    print("|---|---:|" + "---:|" * (len(STAGES) + 1))
    for row in (pipeline, fine_only, naive):
        other = "—" if row is not naive else f"{row.seconds - sum(row.stages.values()):.2f}"
        print(f"| {row.method} | {row.seconds:.1f} | "
              + " | ".join(f"{row.stages.get(s, 0.0):.2f}" for s in STAGES) + f" | {other} |")
    share = pipeline.per_second / bound.per_second
    speedup = pipeline.per_second / naive.per_second
    other = sum(naive.stages.get(s, 0.0) for s in ("decode", "segment", "label", "store"))
    embed = max(naive.stages.get("embed", 0.0), 1e-9)
    print(f"\n- pipeline at {share:.0%} of forward-only images/s: goal (≥ {GOAL_OF_FORWARD:.0%}) "
          f"{'MET' if share >= GOAL_OF_FORWARD else 'NOT met'}")
    print(f"- pipeline {speedup:.2f}× the naive loop; in the naive loop the stages other than embed take "
          f"{other:.1f} s beside embed's {embed:.1f} s "
          f"({other / embed:.0%}): goal (≥ {GOAL_OVER_NAIVE:.0f}× where "
          f"they are not negligible) {'MET' if speedup >= GOAL_OVER_NAIVE else 'NOT met'}")
    hierarchy = pipeline.per_second / fine_only.per_second
    print(f"- with the region hierarchy (built, labelled and stored) the pipeline runs at {hierarchy:.2f}× "
          f"its speed with fine segments only: goal (≥ {GOAL_HIERARCHY}×) "
          f"{'MET' if hierarchy >= GOAL_HIERARCHY else 'NOT met'}")


def add_kmeans_arguments(parser: argparse.ArgumentParser) -> None:
    """bench/kmeans_speed.py's options, prefixed with --kmeans-, with its defaults."""
    parser.add_argument("--kmeans-batch", type=int, default=16)
    parser.add_argument("--kmeans-size", type=int, default=40)
    parser.add_argument("--kmeans-dim", type=int, default=64)
    parser.add_argument("--kmeans-grid", type=int, nargs=2, default=[6, 6])
    parser.add_argument("--kmeans-iterations", type=int, default=10)
    parser.add_argument("--kmeans-repeats", type=int, default=5)
    parser.add_argument("--kmeans-device", default="cuda" if torch.cuda.is_available() else "cpu")


def run_kmeans(args: argparse.Namespace) -> None:
    """Run and print the k-means comparison exactly as bench/kmeans_speed.py does."""
    options = argparse.Namespace(
        batch=args.kmeans_batch, size=args.kmeans_size, dim=args.kmeans_dim, grid=args.kmeans_grid,
        iterations=args.kmeans_iterations, repeats=args.kmeans_repeats, device=args.kmeans_device,
        threads=args.threads,
    )
    k = options.grid[0] * options.grid[1]
    print(f"\n### Spherical k-means: B={options.batch} images of {options.size}x{options.size}, "
          f"D={options.dim}, k={k}, {options.iterations} iterations, best of {options.repeats}\n")
    rows = kmeans_speed.run(options)
    reference = next(row for row in rows if row.method.startswith("faiss per image, random"))
    print("ratios are relative to faiss per image, random init (speed ratio > 1: faster)\n")
    kmeans_speed.print_table(rows, reference)


def run_search(args: argparse.Namespace) -> None:
    config = search_speed.config_from_args(args, args.threads, prefix="search_")
    rows, sweep = search_speed.run(config)
    search_speed.print_tables(rows, sweep, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for torch and faiss")
    add_pipeline_arguments(parser)
    add_kmeans_arguments(parser)
    search_speed.add_arguments(parser, prefix="search-")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    log.info("parts %s; torch threads %d, faiss threads %d", " ".join(args.parts),
             torch.get_num_threads(), faiss.omp_get_max_threads())
    runners = {"pipeline": run_pipeline, "kmeans": run_kmeans, "search": run_search}
    for part in args.parts:
        start = time.perf_counter()
        runners[part](args)
        print(f"\n({part}: {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
