"""Shared fixtures: a tiny real checkpoint, a tiny real index, and real servers on loopback.

The checkpoint is trained for a few steps from scratch (small backbone, Sobel edges); the
index is built by the indexer's own pipeline from mosaic test images and one photograph
that the decoder shrinks (so region coordinates are mapped between sizes). Each server gets
its own copy of the index (an index has one writer, and tests add and delete images).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segsearch.indexer.decode import DecodeConfig
from segsearch.indexer.pipeline import IndexConfig, index_corpus
from segsearch.spml.segmenter import SegmenterConfig
from segsearch.service.config import BatchConfig
from segsearch.trainer.config import TrainConfig
from segsearch.trainer.datasets import DataConfig
from segsearch.trainer.train import train

from service_helpers import PHOTO, copy_index, mosaic_images, photo, png_bytes, start_server


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    result = train(TrainConfig(out_dir=str(out), backbone="small", pretrained=False, edge_source="sobel",
                               steps=3, batch_size=4, progress=False, inference_grid=(4, 4),
                               data=DataConfig(image_size=64, num_train=8, num_test=4)))
    return result.checkpoint_path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for number, pixels in enumerate(mosaic_images(5, seed=1)):
        (root / f"mosaic{number}.png").write_bytes(png_bytes(pixels))
    (root / PHOTO).write_bytes(png_bytes(photo()))
    return root


@pytest.fixture(scope="session")
def index_template(tmp_path_factory, corpus_dir, checkpoint_path) -> Path:
    out = tmp_path_factory.mktemp("index-template") / "index"
    config = IndexConfig(progress=False, decode_workers=1, decode=DecodeConfig(max_side=128),
                         segmenter=SegmenterConfig(embed_size=96, grid=(4, 4)))
    summary = index_corpus(corpus_dir, checkpoint_path, out, config)
    assert summary.images_indexed == 6 and summary.skipped == 0
    return out


@pytest.fixture(scope="session")
def served(index_template, checkpoint_path, tmp_path_factory):
    """A server shared by the query tests (they do not change its index), batching on."""
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path,
                           batching=BatchConfig(max_batch=8, max_wait_ms=5))
    yield running
    running.stop()
