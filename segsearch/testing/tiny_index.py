"""The tiny real model, corpus and index that the service tests and the service benches share.

The checkpoint is trained for a few steps from scratch (small backbone, Sobel edges: seconds,
no pretrained weights); the index is built by the indexer's own pipeline from mosaic test
images and one photograph that the decoder shrinks (so region coordinates are mapped between
sizes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segsearch.indexer.config import IndexConfig
from segsearch.indexer.decode import DecodeConfig
from segsearch.service.pngs import encode_image_png
from segsearch.spml.config import SegmenterConfig

PHOTO = "photo.png"  # 256x192, indexed at 128x96 (max_side 128)
INDEX_CONFIG = IndexConfig(progress=False, decode_workers=1, decode=DecodeConfig(max_side=128),
                           segmenter=SegmenterConfig(embed_size=96, grid=(4, 4)))


def mosaic_images(count: int, seed: int) -> list[np.ndarray]:
    """`count` texture mosaics `(96, 96, 3)` uint8 from the mosaic's test split."""
    from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic

    mosaic = TextureMosaic(MosaicConfig(size=96, num_images=count, seed=seed, split="test"))
    return [mosaic[i].image for i in range(count)]


def photo() -> np.ndarray:
    """scikit-image's astronaut at 256x192."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((256, 192), Image.Resampling.BILINEAR))


def train_tiny_checkpoint(out: Path) -> Path:
    from segsearch.trainer.config import TrainConfig
    from segsearch.trainer.datasets import DataConfig
    from segsearch.trainer.train import train

    torch.manual_seed(0)
    result = train(TrainConfig(out_dir=str(out), backbone="small", pretrained=False, edge_source="sobel",
                               steps=3, batch_size=4, progress=False, inference_grid=(4, 4),
                               data=DataConfig(image_size=64, num_train=8, num_test=4)))
    return Path(result.checkpoint_path)


def write_tiny_corpus(root: Path) -> Path:
    """Five mosaics and the photo as PNG files in `root`; returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for number, pixels in enumerate(mosaic_images(5, seed=1)):
        (root / f"mosaic{number}.png").write_bytes(encode_image_png(pixels))
    (root / PHOTO).write_bytes(encode_image_png(photo()))
    return root


def build_tiny_index(corpus: Path, checkpoint: Path, out: Path):
    """Index `corpus` into `out` with the tests' settings; returns the run's `IndexSummary`."""
    from segsearch.indexer.pipeline import index_corpus

    return index_corpus(corpus, checkpoint, out, INDEX_CONFIG)
