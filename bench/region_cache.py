"""Region queries that reuse work: the in-process cost of a region query when its image was
embedded moments ago (the embedding cache) beside a first query of that image, with the
default HED-VGG16 model at the default 320 px.

    python bench/region_cache.py [--images 8] [--regions 5]

A 1-step checkpoint on the pretrained backbone (the forward pass is what is timed, not the
quality) indexes the tiny corpus; then for each of `--images` mosaic photos (not indexed) the
first box query (decode + segmentation, which embeds the image, + region pick + search) and
`--regions` more boxes of the same image (hash + cached region level + pick + search) are timed through `queries.region_query` and
`search.search`, the code the servicer runs. Prints p50/p90 of both and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from segsearch.service.app import ServiceApp
from segsearch.service.queries import RegionSpec, region_query
from segsearch.service.regions import Box
from segsearch.service.search import SearchOptions, search
from segsearch.testing.tiny_index import build_tiny_index, mosaic_images, write_tiny_corpus
from segsearch.service.pngs import encode_image_png


def vgg_checkpoint(out: Path) -> Path:
    from segsearch.trainer.config import TrainConfig
    from segsearch.trainer.datasets import DataConfig
    from segsearch.trainer.train import train

    torch.manual_seed(0)
    result = train(TrainConfig(out_dir=str(out), steps=1, batch_size=2, progress=False,
                               data=DataConfig(image_size=64, num_train=4, num_test=2)))
    return Path(result.checkpoint_path)


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--regions", type=int, default=5, help="further regions per image (default: %(default)s)")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)  # as `segsearch serve` does (--faiss-threads)
    with tempfile.TemporaryDirectory(prefix="region-cache-") as folder:
        root = Path(folder)
        checkpoint = vgg_checkpoint(root / "model")
        build_tiny_index(write_tiny_corpus(root / "corpus"), checkpoint, root / "index")
        app = ServiceApp.load(root / "index", checkpoint, read_only=True)
        try:
            first, again = [], []
            rng = np.random.default_rng(0)
            for pixels in mosaic_images(args.images, seed=99):
                data = encode_image_png(np.kron(pixels, np.ones((4, 4, 1), np.uint8)))  # 384 px photos

                def query(box: Box) -> None:
                    vector = region_query(app.analyzer, data, RegionSpec(box=box)).vector
                    search(app.store, vector, SearchOptions(top_k=10))

                first.append(timed(lambda: query(Box(0, 0, 192, 192))))
                for _ in range(args.regions):
                    x, y = (int(v) for v in rng.integers(0, 192, size=2))
                    again.append(timed(lambda: query(Box(x, y, x + 160, y + 160))))
        finally:
            app.close()
    p50_first, p50_again = np.percentile(first, 50), np.percentile(again, 50)
    print("| region query | n | p50 ms | p90 ms |")
    print("|---|---:|---:|---:|")
    print(f"| first region of an image (embeds it) | {len(first)} | {p50_first:.1f} | {np.percentile(first, 90):.1f} |")
    print(f"| another region of the same image (cached) | {len(again)} | {p50_again:.1f} | "
          f"{np.percentile(again, 90):.1f} |")
    print(f"cached / first p50: {p50_again / p50_first:.3f} ({p50_first / p50_again:.0f}x faster); "
          f"torch threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
