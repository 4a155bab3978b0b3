"""Load and overload on real servers: the generator's bounds, shedding with RESOURCE_EXHAUSTED
while health stays SERVING, recovery after the load; the RSS soak (slow, `--runslow`)."""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from segsearch.indexer.index_store import IndexStore
from segsearch.service.loadgen import HealthProbe, LoadConfig, RequestMix, arrival_offsets, run_load
from service_helpers import copy_index, mosaic_images, png_bytes, start_server

SOAK_SECONDS = float(os.environ.get("SEGSEARCH_SOAK_SECONDS", "120"))
SOAK_BOUND_MIB = 50.0


def _served_ids(running) -> np.ndarray:
    """The ids of an in-process server's index `(N,)` (its own store: LMDB opens once a process)."""
    return running.server.servicer.app.store.segment_ids()[0]


def _segment_ids(index_dir: Path) -> np.ndarray:
    store = IndexStore.open(index_dir, read_only=True)  # no writer lock
    try:
        return store.segment_ids()[0]
    finally:
        store.close()


def test_generator_stops_by_itself_at_its_count_and_time_bounds(served):
    mix = RequestMix(_served_ids(served))
    counted = run_load(served.address, mix, LoadConfig(mode="closed", clients=4, requests=25, seconds=60))
    assert len(counted.calls) == 25 and counted.codes == {"OK": 25}

    started = time.perf_counter()
    timed = run_load(served.address, mix, LoadConfig(mode="closed", clients=2, requests=10**9, seconds=0.5))
    assert time.perf_counter() - started < 0.5 + 5 and 0 < len(timed.calls) < 10**9

    fixed = LoadConfig(mode="open", rate=40, arrivals="fixed", requests=10**6, seconds=1.0)
    assert len(arrival_offsets(fixed, np.random.default_rng(0))) == 40
    started = time.perf_counter()
    opened = run_load(served.address, mix, fixed)
    assert len(opened.calls) + sum(opened.missed.values()) == 40 and opened.codes["OK"] > 0
    assert time.perf_counter() - started < 1.0 + 5

    few = run_load(served.address, mix, LoadConfig(mode="open", rate=200, requests=7, seconds=60))
    assert len(few.calls) + sum(few.missed.values()) == 7


def test_overload_sheds_keeps_health_serving_and_recovers(index_template, checkpoint_path, tmp_path_factory):
    """max_concurrent 2 and 16 clients (half the calls embed a query region): some calls are
    refused by our limiter at once, the others answered, no other status; health is never
    refused or slow to answer meanwhile; the next call after the load is answered quickly."""
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path, max_concurrent=2,
                           metrics_port=None)
    try:
        ids = _served_ids(running)
        mix = RequestMix.with_images(ids, mosaic_images(3, seed=5), region_fraction=0.5, top_k=5)
        with HealthProbe(running.address, interval=0.05, timeout=2.0) as probe:
            result = run_load(running.address, mix,
                              LoadConfig(mode="closed", clients=16, requests=10**6, seconds=2, timeout=20))
        codes = result.codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0, codes
        assert result.pool_rejections == 0, "refused by gRPC's thread-pool limit, not by the concurrency limit"
        assert probe.result.count >= 10 and probe.result.serving == probe.result.count, probe.result.outcomes

        begin = time.perf_counter()
        response = running.client.search_segment(int(ids[0]), top_k=5, timeout=5, level="fine")
        assert time.perf_counter() - begin < 1.0 and response.hits[0].segment_id == ids[0]
        assert running.client.health(timeout=2) == "SERVING"
    finally:
        running.stop()


@pytest.mark.slow
def test_soak_keeps_the_server_rss_bounded(index_template, checkpoint_path, tmp_path_factory):
    """`segsearch serve` in a child process under steady open-loop load for SEGSEARCH_SOAK_SECONDS
    (default 120): its RSS after the warm-up grows by less than 50 MiB and it keeps answering."""
    from segsearch.testing.serve_process import ServeProcess
    from segsearch.testing.soak import soak

    index_dir = copy_index(index_template, tmp_path_factory)
    mix = RequestMix(_segment_ids(index_dir))  # read before the server holds the index
    server = ServeProcess(index_dir, checkpoint_path, tmp_path_factory.mktemp("soak"),
                          extra=["--max-concurrent", "8", "--grace", "5"], start_timeout=180.0)
    try:
        result = soak(server, mix, LoadConfig(mode="open", rate=50, clients=32, requests=1 << 30, seconds=10),
                      SOAK_SECONDS, window_s=10, rss_every=2, bound_mib=SOAK_BOUND_MIB)
    finally:
        exit_status = server.stop()
    print(result.text())
    codes = sum((window.codes for window in result.windows), start=Counter())
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] >= 0.95 * sum(codes.values()), codes
    assert result.within_bound, result.text()
    assert exit_status == 0


def test_load_command_prints_a_summary(served, tmp_path, capsys):
    from segsearch.cli import main

    ids = _served_ids(served)
    assert np.array_equal(ids, np.arange(ids[0], ids[-1] + 1))  # the indexer numbers segments densely
    query = tmp_path / "query.png"
    query.write_bytes(png_bytes(mosaic_images(1, seed=9)[0]))
    status = main(["load", "--server", served.address, "--ids", f"{ids[0]}-{ids[-1]}", "--region-images",
                   str(query), "--region-fraction", "0.25", "--clients", "3", "--requests", "20", "--json",
                   "--probe-health"])
    summary = json.loads(capsys.readouterr().out)
    assert status == 0 and summary["sent"] == 20 and summary["codes"] == {"OK": 20}
    assert summary["health"]["outcomes"] == {"SERVING": summary["health"]["checks"]}
