"""`segsearch demo`: the whole product end to end on embedded defaults.

1. train SPML on the built-in texture mosaic (scribbles, frozen HED-VGG16, features cached);
2. evaluate it beside the trivial baselines (eval.json, overlays, confusion matrix);
3. write a small corpus (the mosaic's test images + scikit-image photographs) and index it
   (LMDB + a local FAISS file, no server to install);
4. start the gRPC service on a free loopback port, ask it for segments like a box of a test
   image and to segment a photograph, write the pictures, and shut it down;
5. show the general model segsearch ships (no training, no --model) on photographs it never
   saw: index them, segment one, and ask for segments like a point on another.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
# photographs for the shipped general model: none of them is in its training data (game textures)
GENERAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "stereo_motorcycle")


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train, evaluate, index, serve and query, end to end",
                              description="Train SPML on the built-in texture mosaic, evaluate it, index a "
                              "small corpus, serve it on loopback and query it; everything under WORKDIR.")
    p.add_argument("--workdir", default="segsearch-demo", help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default: %(default)s)")
    p.add_argument("--supervision", default="scribbles",
                   choices=("tags", "boxes", "scribbles", "points"), help="weak labels (default: %(default)s)")
    p.set_defaults(handler=run_demo)


def write_corpus(corpus_dir: Path, test_samples, photos=PHOTOS) -> list[Path]:
    """Test mosaics and a few bundled photographs as PNG files; returns the mosaic paths."""
    import skimage.data

    corpus_dir.mkdir(parents=True, exist_ok=True)
    mosaic_paths = []
    for sample in test_samples:
        path = corpus_dir / f"{sample.image_id}.png"
        Image.fromarray(sample.image).save(path)
        mosaic_paths.append(path)
    for name in photos:
        image = getattr(skimage.data, name)()
        image = np.asarray(image[0] if isinstance(image, tuple) else image)  # a stereo pair: its left view
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        Image.fromarray(image[..., :3]).save(corpus_dir / f"photo-{name}.png")
    return mosaic_paths


def region_box(mask: np.ndarray, class_index: int) -> tuple[int, int, int, int]:
    """A box inside the region of `class_index` (the middle half of its bounding box)."""
    ys, xs = np.nonzero(mask == class_index)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    dy, dx = (y1 - y0) // 4, (x1 - x0) // 4
    return int(x0 + dx), int(y0 + dy), int(x1 - dx), int(y1 - dy)


def run_demo(args) -> int:
    from segsearch.indexer.pipeline import IndexConfig, index_corpus
    from segsearch.service.cli import print_hits
    from segsearch.service.client import SegsearchClient
    from segsearch.service.server import SegsearchServer
    from segsearch.service.config import ServerConfig
    from segsearch.service.sheets import write_query_sheet, write_segment_overlay
    from segsearch.trainer.config import TrainConfig
    from segsearch.trainer.datasets import DataConfig, load_split
    from segsearch.trainer.evaluate import EvalConfig, evaluate_checkpoint
    from segsearch.trainer.train import train

    workdir = Path(args.workdir)
    run_dir = workdir / f"spml-{args.supervision}"
    print("== 1/5 train")
    result = train(TrainConfig(out_dir=str(run_dir), supervision=args.supervision, steps=args.steps,
                               data=DataConfig()))
    print("== 2/5 evaluate")
    report = evaluate_checkpoint(EvalConfig(checkpoint=str(result.checkpoint_path)))
    print(report.summary())
    print("== 3/5 index")
    test = load_split(DataConfig(), "test").samples
    mosaics = write_corpus(workdir / "corpus", test)
    summary = index_corpus(workdir / "corpus", result.checkpoint_path, workdir / "index", IndexConfig())
    print(summary.format())
    print("== 4/5 serve and query")
    server = SegsearchServer(ServerConfig(index_dir=str(workdir / "index"), checkpoint=str(result.checkpoint_path),
                                          port=0, metrics_port=0))
    server.start_loaded()
    try:
        query = test[0]
        box = region_box(query.mask, int(query.mask[query.mask.shape[0] // 2, query.mask.shape[1] // 2]))
        with SegsearchClient(server.address) as client:
            query_png = mosaics[0].read_bytes()
            hits = client.search_box(query_png, box, top_k=11, exclude_image_ids=[mosaics[0].name],
                                     include_masks=True)
            print_hits(hits.hits)
            print(f"contact sheet: {write_query_sheet(query_png, hits, workdir / 'query_sheet.png', mosaics[0].name, workdir / 'corpus')}")
            photo_png = (workdir / "corpus" / "photo-coffee.png").read_bytes()
            segments = client.segment(photo_png)
            print(f"{len(segments.segments)} segments of photo-coffee.png")
            print(f"overlay: {write_segment_overlay(photo_png, segments, workdir / 'segment_overlay.png')}")
        print(f"metrics were served at http://127.0.0.1:{server.metrics_port}/metrics")
    finally:
        server.stop(grace=1.0)
    print("== 5/5 the shipped general model on photographs it never saw")
    show_general_model(workdir)
    print(f"\nall outputs under {workdir}/:\n  {run_dir.name}/checkpoint.pt loss_curve.png train_log.jsonl "
          "eval.json eval_overlays.png eval_confusion.png\n  index/ (LMDB + FAISS)  query_sheet.png  "
          "segment_overlay.png\n  general/index/  general/query_sheet.png  general/segment_overlay.png")
    return 0


def show_general_model(workdir: Path) -> None:
    """Index photographs with the shipped model (as `segsearch index photos/ --out idx` does
    without --model), serve them, segment one and query a point of another."""
    from segsearch.indexer.pipeline import IndexConfig, index_corpus
    from segsearch.service.cli import print_hits
    from segsearch.service.client import SegsearchClient
    from segsearch.service.config import ServerConfig
    from segsearch.service.server import SegsearchServer
    from segsearch.service.sheets import write_query_sheet, write_segment_overlay
    from segsearch.spml.checkpoint import resolve_checkpoint

    general = workdir / "general"
    write_corpus(general / "photos", [], GENERAL_PHOTOS)
    model = resolve_checkpoint(None)
    print(index_corpus(general / "photos", model, general / "index", IndexConfig()).format())
    server = SegsearchServer(ServerConfig(index_dir=str(general / "index"), checkpoint=str(model),
                                          port=0, metrics_port=0))
    server.start_loaded()
    try:
        with SegsearchClient(server.address) as client:
            photo_png = (general / "photos" / "photo-chelsea.png").read_bytes()
            segments = client.segment(photo_png)
            print(f"{len(segments.segments)} regions of photo-chelsea.png (labels: none, the general "
                  "model has no label bank)")
            print(f"overlay: {write_segment_overlay(photo_png, segments, general / 'segment_overlay.png')}")
            query = general / "photos" / "photo-astronaut.png"
            hits = client.search_point(query.read_bytes(), (180, 110), top_k=11, include_masks=True)
            print_hits(hits.hits)
            print(f"contact sheet: {write_query_sheet(query.read_bytes(), hits, general / 'query_sheet.png', query.name, general / 'photos')}")
    finally:
        server.stop(grace=1.0)
