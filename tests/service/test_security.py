"""Security: the bearer token on every RPC but health (reflection included), compared in
constant time; TLS refusing plaintext and untrusted clients; no secret in any log line at
DEBUG; paths sent by a client never opened; message size and pixel limits on every image
field. Real servers on loopback (in-process, or a `segsearch serve` child for logs and TLS).

test_lifecycle.py already checks the token on GetInfo, TLS with one trusted client and the
size limit on Segment; these extend each to everything a client can send.
"""
from __future__ import annotations

import ast
import logging
import inspect
import shutil
import subprocess
import textwrap
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from segsearch.testing.fuzz_strategies import METHODS, Call, FuzzClient, png_claiming
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.config import ServiceLimits
from segsearch.service.client import SegsearchClient
from segsearch.service.interceptors import AuthInterceptor, build_interceptors
from segsearch.service.prometheus import ServiceMetrics
from segsearch.testing.serve_process import ServeProcess
from service_helpers import copy_index, metric_value, png_bytes, start_server

TOKEN = "tok-3f9c1e7a-SECRET-d41d8cd98f00"
NEEDS_OPENSSL = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _image(width: int, height: int, seed: int = 0) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details() or ""


# ---- the bearer token ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_server(index_template, checkpoint_path, tmp_path_factory):
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path, token=TOKEN,
                           metrics_port=None)
    yield running
    running.stop()


BAD_CREDENTIALS = {
    "none": (),
    "wrong": (("authorization", "Bearer not-the-token"),),
    "no-scheme": (("authorization", TOKEN),),
    "other-scheme": (("authorization", f"Basic {TOKEN}"),),
    "prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
    "suffix": (("authorization", f"Bearer {TOKEN}x"),),
    "empty": (("authorization", "Bearer "),),
    "other-header": (("x-authorization", f"Bearer {TOKEN}"),),
}


def _empty_call(method: str) -> Call:
    """A default request of `method` (IndexImages: a stream of one empty image)."""
    request = getattr(pb, METHODS[method].input_type.name)()
    return Call.of(method, [request] if METHODS[method].client_streaming else request)


def test_the_descriptor_lists_the_seven_rpcs():
    """The loop below covers whatever the service descriptor lists; this pins what that is."""
    assert sorted(METHODS) == ["DeleteImages", "GetInfo", "GetSegment", "IndexImages", "SearchSimilar",
                               "SearchSimilarBatch", "Segment"]
    assert METHODS["IndexImages"].client_streaming


@pytest.mark.parametrize("credentials", sorted(BAD_CREDENTIALS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_rpc_refuses_a_missing_or_wrong_token(token_server, method, credentials):
    client = FuzzClient(token_server.address, metadata=BAD_CREDENTIALS[credentials])
    try:
        for call in (_empty_call(method), Call(method, (b"\xff\xff",))):  # undecodable bytes too
            outcome = client.send(call, timeout=20)
            assert outcome.code == "UNAUTHENTICATED", outcome
            assert "bearer token" in outcome.details and TOKEN not in outcome.details
    finally:
        client.close()


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_the_bearer_scheme_is_case_insensitive(token_server, scheme):
    client = FuzzClient(token_server.address, metadata=(("authorization", f"{scheme} {TOKEN}"),))
    try:
        assert client.send(_empty_call("GetInfo"), timeout=20).code == "OK"
    finally:
        client.close()


def test_authentication_failures_are_logged_without_the_token(token_server, caplog):
    sent = "a-wrong-token-that-must-not-be-logged"
    client = FuzzClient(token_server.address, metadata=(("authorization", f"Bearer {sent}"),))
    try:
        with caplog.at_level(logging.WARNING, logger="segsearch.service.interceptors"):
            assert client.send(_empty_call("GetInfo"), timeout=20).code == "UNAUTHENTICATED"
    finally:
        client.close()
    failures = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    assert failures and "GetInfo" in failures[0]
    assert all(sent not in text and TOKEN not in text for text in caplog.messages)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_rpc_accepts_the_token(token_server, method):
    client = FuzzClient(token_server.address, metadata=(("authorization", f"Bearer {TOKEN}"),))
    try:
        outcome = client.send(_empty_call(method), timeout=20)
    finally:
        client.close()
    assert outcome.code not in ("UNAUTHENTICATED", "INTERNAL", "UNKNOWN"), outcome


def test_reflection_needs_the_token_and_health_does_not(token_server):
    with grpc.insecure_channel(token_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([listing]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ServerReflectionInfo(iter([listing]), timeout=10,
                                                 metadata=(("authorization", f"Bearer {TOKEN}"),)))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "segsearch.v1.SegmentSearch" in names
    with SegsearchClient(token_server.address, timeout=10) as anonymous:
        assert anonymous.health() == "SERVING"
        assert anonymous.health("segsearch.v1.SegmentSearch") == "SERVING"


def test_the_token_is_compared_in_constant_time():
    """`_authorized` compares with hmac.compare_digest, and no `==`/`!=`/`in` on the token."""
    source = textwrap.dedent(inspect.getsource(AuthInterceptor._authorized))
    tree = ast.parse(source)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert any(ast.unparse(node.func) == "hmac.compare_digest" for node in calls), source
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = ast.unparse(node)
            assert "_expected" not in operands and "given" not in operands, f"non-constant-time compare: {operands}"
    guard = AuthInterceptor(TOKEN)
    assert guard._authorized([("authorization", f"Bearer {TOKEN}")])
    assert guard._authorized([("authorization", f"Bearer {TOKEN}".encode())])
    assert not guard._authorized([("authorization", f"Bearer {TOKEN} ")])
    chain = build_interceptors(ServiceMetrics(), 2, token=TOKEN)
    assert any(isinstance(interceptor, AuthInterceptor) for interceptor in chain)


# ---- TLS, and no secret in the logs ----------------------------------------------------------

def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}-key.pem", folder / f"{name}-cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


@NEEDS_OPENSSL
def test_tls_and_token_server_refuses_plaintext_untrusted_and_anonymous_and_logs_no_secret(
        index_template, checkpoint_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls-secrets")
    key, cert = _self_signed(folder, "server")
    _, other_cert = _self_signed(folder, "other")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    server = ServeProcess(copy_index(index_template, tmp_path_factory), checkpoint_path, folder / "logs",
                          extra=["--token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key)],
                          verbose=True, env={"GRPC_VERBOSITY": "debug"})
    try:
        assert TOKEN not in " ".join(psutil.Process(server.pid).cmdline())
        _check_tls_clients(server.address, cert, other_cert)
    finally:
        exit_code = server.stop()
    logs = server.logs()
    assert exit_code == 0, logs[-2000:]
    assert " DEBUG " in logs and "TLS" in logs  # DEBUG logging was on: the check below is not vacuous
    assert TOKEN not in logs
    key_body = "".join(line for line in key.read_text().splitlines() if not line.startswith("-----"))
    assert not any(key_body[i:i + 32] in logs for i in range(0, len(key_body) - 32, 32))


def _check_tls_clients(address: str, cert: Path, other_cert: Path) -> None:
    with SegsearchClient(address, timeout=5) as plaintext:
        assert _code(plaintext.info)[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    with SegsearchClient(address, root_cert=other_cert, timeout=5) as untrusting:
        assert _code(untrusting.info)[0] == grpc.StatusCode.UNAVAILABLE
    with SegsearchClient(address, root_cert=cert, timeout=20) as anonymous:
        code, details = _code(anonymous.info)
        assert code == grpc.StatusCode.UNAUTHENTICATED and TOKEN not in details
        assert _code(anonymous.segment, _image(16, 16))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.health() == "SERVING"
    with SegsearchClient(address, root_cert=cert, token=TOKEN, timeout=20) as authorized:
        assert authorized.info().num_images == 6
        assert authorized.segment(_image(16, 16)).segments
        assert _code(authorized.get_segment, 10 ** 9)[0] == grpc.StatusCode.NOT_FOUND


# ---- paths sent by a client are never opened ----------------------------------------------

@pytest.fixture(scope="module")
def plain_server(index_template, checkpoint_path, tmp_path_factory):
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path, metrics_port=None)
    yield running
    running.stop()


def test_paths_and_uris_from_a_client_are_never_opened(plain_server, tmp_path):
    """A sentinel image file sits at the paths the client names. Had the server read it, the
    index would hold its size and content hash; it holds only the bytes sent."""
    sentinel = tmp_path / "sentinel.png"
    sentinel_bytes, sent_bytes = _image(50, 40, seed=11), _image(30, 20, seed=12)
    sentinel.write_bytes(sentinel_bytes)
    client = plain_server.client
    added = client.index_images([
        pb.IndexImageRequest(image=pb.Image(data=sent_bytes, image_id="sent"), uri=str(sentinel)),
        pb.IndexImageRequest(image=pb.Image(data=b"", image_id=str(sentinel)), uri=f"file://{sentinel}"),
        pb.IndexImageRequest(image=pb.Image(data=b"", image_id="/etc/passwd"), uri="/etc/passwd"),
        pb.IndexImageRequest(image=pb.Image(data=b""), uri=str(sentinel)),
    ])
    assert [i.image_id for i in added.indexed] == ["sent"]
    assert [skipped.reason.split(":")[0] for skipped in added.skipped] == ["empty_file"] * 3
    record = client.get_segment(added.indexed[0].segment_ids[0])
    assert record.image_uri == sentinel.name  # an opaque string, shown relative (--image-uris relative)
    assert (record.image_width, record.image_height) == (30, 20)  # the sent image's, not the file's 50x40
    again = client.index_images([("sentinel-content", sentinel_bytes), ("sent-again", sent_bytes)])
    assert [i.image_id for i in again.indexed] == ["sentinel-content"]  # its hash was never stored
    assert "same content" in again.skipped[0].reason
    for image_id in (str(sentinel), f"file://{sentinel}", "/etc/passwd"):
        query = pb.RegionQuery(image=pb.Image(image_id=image_id), region=pb.Region(box=pb.Box(x1=4, y1=4)))
        code, details = _code(client.search, pb.SearchRequest(region=query))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "image.data is empty" in details
        code, details = _code(client.stub.Segment, pb.SegmentRequest(image=pb.Image(image_id=image_id)), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "image.data is empty" in details
    client.delete_images(["sent", "sentinel-content"])


# ---- size and pixel limits on every image field -------------------------------------------

@pytest.fixture(scope="module")
def limited_server(index_template, checkpoint_path, tmp_path_factory):
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path,
                           max_message_bytes=1 << 20, limits=ServiceLimits(max_image_pixels=100 * 100))
    yield running
    running.stop()


def test_message_size_limit_holds_for_streams_and_masks(limited_server):
    client, big = limited_server.client, b"\x89PNG" + b"\0" * (1 << 20)
    stream = [pb.IndexImageRequest(image=pb.Image(data=_image(20, 20), image_id="small-first")),
              pb.IndexImageRequest(image=pb.Image(data=big, image_id="too-big"))]
    assert _code(client.index_images, stream)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _code(client.search_mask, _image(20, 20), big)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _code(client.delete_images, ["x" * 400] * 3000)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.health() == "SERVING"
    info = client.info()
    # Regression: gRPC ended the stream as if complete, and the first image was committed although
    # the client was told RESOURCE_EXHAUSTED; or the handler logged gRPC's RpcError as INTERNAL.
    assert (info.num_images, info.max_image_pixels) == (6, 10_000)
    text = limited_server.metrics_text()
    assert metric_value(text, "segsearch_requests_total", method="IndexImages", code="CANCELLED") == 1
    assert metric_value(text, "segsearch_requests_total", method="IndexImages", code="INTERNAL") == 0


def test_pixel_limit_holds_for_every_image_field(limited_server):
    client, over, at_limit = limited_server.client, _image(101, 100), _image(100, 100)
    code, details = _code(client.search_box, over, (0, 0, 4, 4))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "too_many_pixels" in details
    code, details = _code(client.search_point, over, (1, 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "too_many_pixels" in details
    code, details = _code(client.search_box, png_claiming(100_000, 100_000), (0, 0, 4, 4), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "too_many_pixels" in details  # header only: no decode
    added = client.index_images([("over", over), ("at-limit", at_limit)])
    assert [i.image_id for i in added.indexed] == ["at-limit"]
    assert added.skipped[0].image_id == "over" and added.skipped[0].reason.startswith("too_many_pixels")
    code, details = _code(client.search_mask, at_limit, png_claiming(101, 100))  # a mask never exceeds its image
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "the mask must have the image's size" in details
    assert client.search_box(at_limit, (0, 0, 100, 100), top_k=1).hits
    client.delete_images(["at-limit"])
