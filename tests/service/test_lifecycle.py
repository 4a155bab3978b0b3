"""Health states, auth, the concurrency limit, deadlines and TLS, each on its own real server."""
from __future__ import annotations

import shutil
import subprocess
import threading

import grpc
import pytest

from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.client import SegsearchClient
from segsearch.service.server import SegsearchServer
from segsearch.service.config import ServerConfig
from service_helpers import copy_index, metric_value, start_server


def test_health_is_not_serving_until_loaded_and_while_draining(index_template, checkpoint_path, tmp_path_factory):
    config = ServerConfig(index_dir=str(copy_index(index_template, tmp_path_factory)),
                          checkpoint=str(checkpoint_path), port=0, metrics_port=None)
    server = SegsearchServer(config)
    port = server.start()
    client = SegsearchClient(f"127.0.0.1:{port}", timeout=10)
    try:
        assert client.health() == "NOT_SERVING"
        assert client.health("segsearch.v1.SegmentSearch") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as caught:
            client.info()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in caught.value.details()
        server.load()
        assert client.health() == "SERVING" and client.health("segsearch.v1.SegmentSearch") == "SERVING"
        assert client.info().num_images == 6
        server.health.enter_graceful_shutdown()  # the first step of stop(): what a draining server says
        assert client.health() == "NOT_SERVING"
    finally:
        server.stop(grace=1)
        client.close()


def test_bearer_token_guards_everything_but_health(index_template, checkpoint_path, tmp_path_factory):
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path, token="s3cret-token")
    anonymous = SegsearchClient(running.address, timeout=10)
    wrong = SegsearchClient(running.address, token="s3cret-tokeN", timeout=10)
    try:
        assert running.client.info().num_images == 6
        for client in (anonymous, wrong):
            with pytest.raises(grpc.RpcError) as caught:
                client.info()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in caught.value.details()
            assert client.health() == "SERVING"
        text = running.metrics_text()
        assert metric_value(text, "segsearch_requests_total", method="GetInfo", code="UNAUTHENTICATED") == 2
        assert metric_value(text, "segsearch_requests_total", method="GetInfo", code="OK") == 1
    finally:
        anonymous.close()
        wrong.close()
        running.stop()


def _held_stream(release: threading.Event, started: threading.Event):
    """An IndexImages request stream that sends nothing until released (holds a call open)."""
    started.set()
    release.wait(30)
    return
    yield  # a generator


def test_concurrency_limit_answers_resource_exhausted_at_once(index_template, checkpoint_path, tmp_path_factory):
    """One write slot held by a stream: the next write is refused at once, reads go on."""
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path, max_concurrent=1,
                           max_concurrent_writes=1)
    release, started = threading.Event(), threading.Event()
    future = running.client.stub.IndexImages.future(_held_stream(release, started), timeout=30)
    try:
        started.wait(10)
        _wait_for(lambda: metric_value(running.metrics_text(), "segsearch_inflight_requests") == 1)
        with pytest.raises(grpc.RpcError) as caught:
            running.client.delete_images(["mosaic0.png"], timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 concurrent write requests" in caught.value.details()
        assert running.client.info(timeout=5).num_images == 6  # reads have their own slot
        assert running.client.health() == "SERVING"  # probes are not limited
    finally:
        release.set()
    assert future.result(timeout=30).num_segments == 0
    assert running.client.delete_images(["mosaic0.png"]).num_images == 1  # the slot is free again
    text = running.metrics_text()
    assert metric_value(text, "segsearch_requests_total", method="DeleteImages", code="RESOURCE_EXHAUSTED") == 1
    running.stop()


def test_deadline_is_respected_and_the_server_survives(index_template, checkpoint_path, tmp_path_factory):
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path)
    release, started = threading.Event(), threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            running.client.stub.IndexImages(_held_stream(release, started), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        _wait_for(lambda: metric_value(running.metrics_text(), "segsearch_inflight_requests") == 0)
        assert running.client.info().num_images == 6  # nothing was indexed, the server serves on
    finally:
        release.set()
        running.stop()


def test_expired_deadline_abandons_work_between_stages():
    """The scope refuses to start a stage once the deadline has passed."""
    import time

    from segsearch.service.errors import DeadlineExceeded
    from segsearch.service.request_scope import RequestScope, request_scope, stage

    ran = []
    with request_scope(RequestScope("Segment", deadline=time.monotonic() - 0.01)):
        with pytest.raises(DeadlineExceeded):
            with stage("embed"):
                ran.append(True)
    assert ran == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_server_accepts_tls_clients_only(index_template, checkpoint_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path,
                           tls_cert=str(cert), tls_key=str(key), metrics_port=None)
    secure = SegsearchClient(running.address, root_cert=cert, timeout=10)
    try:
        assert secure.info().num_images == 6
        with pytest.raises(grpc.RpcError) as caught:
            running.client.info(timeout=3)  # plaintext client
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        secure.close()
        running.stop()


def _wait_for(condition, seconds: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_request_builder_rejects_two_queries():
    from segsearch.service.client import search_request

    with pytest.raises(ValueError):
        search_request(segment_id=1, region=pb.RegionQuery())


def test_messages_over_the_size_limit_are_refused(index_template, checkpoint_path, tmp_path_factory):
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path,
                           max_message_bytes=1 << 20, metrics_port=None)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            running.client.segment(b"\0" * (2 << 20))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert running.client.info().num_images == 6
    finally:
        running.stop()


def test_metrics_stay_on_loopback_whatever_host_says(index_template, checkpoint_path, tmp_path_factory):
    """--host exposes gRPC; /metrics (it names the index and its model) follows --metrics-host,
    127.0.0.1 by default. 127.0.0.2 stands for "another address" without leaving loopback."""
    import urllib.error
    import urllib.request

    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path, host="127.0.0.2")
    try:
        assert running.address.startswith("127.0.0.2:") and running.client.health(timeout=5) == "SERVING"
        assert "segsearch_requests_total" in running.metrics_text()  # at 127.0.0.1
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.2:{running.server.metrics_port}/metrics", timeout=5)
    finally:
        running.stop()


def test_the_server_pins_faiss_threads_in_the_threads_that_answer(index_template, checkpoint_path,
                                                                  tmp_path_factory):
    """OpenMP's thread count is per thread: the count must be set in the gRPC worker threads,
    which GetInfo reports from the thread that answered. A count no thread has by default
    (one more than this thread's) shows that the server set it there."""
    import faiss

    before = faiss.omp_get_max_threads()
    wanted = before + 1
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path, faiss_threads=wanted)
    try:
        assert running.client.info().faiss_threads == wanted
        assert running.client.search_segment(1, top_k=3).hits
    finally:
        running.stop()
        faiss.omp_set_num_threads(before)
