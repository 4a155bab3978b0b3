"""Shared fixtures: a tiny real checkpoint, a tiny real index (`segsearch.testing.tiny_index`),
and real servers on loopback. Each server gets its own copy of the index (an index has one
writer, and tests add and delete images).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from segsearch.service.config import BatchConfig
from segsearch.testing.tiny_index import build_tiny_index, train_tiny_checkpoint, write_tiny_corpus

from service_helpers import copy_index, start_server


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def index_template(tmp_path_factory, corpus_dir, checkpoint_path) -> Path:
    out = tmp_path_factory.mktemp("index-template") / "index"
    summary = build_tiny_index(corpus_dir, checkpoint_path, out)
    assert summary.images_indexed == 6 and summary.skipped == 0
    return out


@pytest.fixture(scope="session")
def served(index_template, checkpoint_path, tmp_path_factory):
    """A server shared by the query tests (they do not change its index), batching on."""
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path,
                           batching=BatchConfig(max_batch=8, max_wait_ms=5))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sharded_out(tmp_path_factory, corpus_dir, checkpoint_path):
    """OUT with OUT/shards (2 shards) and the merged index at OUT."""
    import distributed

    from segsearch.indexer.dask_runner import DaskConfig, index_distributed
    from segsearch.testing.tiny_index import INDEX_CONFIG

    out = tmp_path_factory.mktemp("sharded") / "index"
    config = dataclasses.replace(INDEX_CONFIG, index_type="flat")
    threads = torch.get_num_threads()  # the in-process workers set torch's (process-wide) threads
    try:
        # in-process workers (threads, inproc:// comms; their HTTP endpoints, which would listen on
        # all interfaces by default, on loopback); the processes variant is tests/indexer/test_dask_indexing.py
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                      dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0") \
                as cluster, distributed.Client(cluster) as client:
            summary = index_distributed(corpus_dir, checkpoint_path, out, config, DaskConfig(), client=client)
    finally:
        torch.set_num_threads(threads)
    assert summary.num_shards == 2 and summary.images_indexed == 6
    return out
