"""The committed generated code is what protoc makes of the committed .proto, and the
contract keeps the names clients are written against."""
from __future__ import annotations

from segsearch.service import proto_build
from segsearch.service._generated import segment_search_pb2 as pb


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    written = proto_build.generate(tmp_path)
    assert [path.name for path in written] == list(proto_build.GENERATED)
    for path in written:
        committed = proto_build.GENERATED_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale: run `python -m segsearch.service.proto_build`")


def test_contract_names():
    service = pb.DESCRIPTOR.services_by_name["SegmentSearch"]
    assert pb.DESCRIPTOR.package == "segsearch.v1" and pb.DESCRIPTOR.name == "segsearch/v1/segment_search.proto"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming) for m in service.methods}
    assert methods == {
        "SearchSimilar": ("SearchRequest", "SearchResponse", False),
        "SearchSimilarBatch": ("SearchBatchRequest", "SearchBatchResponse", False),
        "Segment": ("SegmentRequest", "SegmentResponse", False),
        "GetSegment": ("GetSegmentRequest", "SegmentRecord", False),
        "IndexImages": ("IndexImageRequest", "IndexImagesResponse", True),
        "DeleteImages": ("DeleteImagesRequest", "DeleteImagesResponse", False),
        "GetInfo": ("GetInfoRequest", "InfoResponse", False),
    }
    assert {"search_effort"} <= {f.name for f in pb.SearchRequest.DESCRIPTOR.fields}
    assert {"image_ids", "segment_ids"} == {f.name for f in pb.DeleteImagesRequest.DESCRIPTOR.fields}
    assert {"ef_search", "nprobe", "max_search_effort", "max_batch_queries"} <= \
        {f.name for f in pb.InfoResponse.DESCRIPTOR.fields}
    query = pb.SearchRequest.DESCRIPTOR.oneofs_by_name["query"]
    assert [f.name for f in query.fields] == ["region", "segment_id", "embedding"]
    assert [f.name for f in pb.Region.DESCRIPTOR.oneofs_by_name["shape"].fields] == ["mask_png", "box", "point"]
    assert {f.name for f in pb.Filter.DESCRIPTOR.fields} == {"labels", "exclude_image_ids", "min_area_fraction"}
    assert {"segment_id", "image_id", "image_uri", "score", "box", "label", "label_score", "area_fraction",
            "mask_png"} <= {f.name for f in pb.Hit.DESCRIPTOR.fields}
