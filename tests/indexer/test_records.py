"""Versioned msgpack encoding of the LMDB records."""

import msgpack
import numpy as np
import pytest

from segsearch.errors import IndexStoreError
from segsearch.indexer import records
from segsearch.indexer.records import (
    ImageRecord,
    IndexMeta,
    SegmentRecord,
    decode_image,
    decode_meta,
    decode_segment,
    decode_segment_prototype,
    encode_image,
    encode_meta,
    encode_segment,
)
from segsearch.indexer.rle import encode_mask


def _segment() -> SegmentRecord:
    mask = np.zeros((6, 9), bool)
    mask[1:4, 2:7] = True
    proto = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    return SegmentRecord(
        segment_id=2**40 + 3, image_id="img/ä-1", box=(2, 1, 7, 4), area_fraction=15 / 54,
        mask_rle=encode_mask(mask), mask_shape=(6, 9), label="cat", label_score=0.75,
        model_version="spml-abc123", prototype=proto / np.linalg.norm(proto),
    )


def test_segment_round_trip_is_exact():
    seg = _segment()
    back = decode_segment(encode_segment(seg))
    assert back == seg
    assert back.prototype.dtype == np.float32
    assert np.array_equal(back.prototype.view(np.uint32), seg.prototype.view(np.uint32))  # bit-exact
    assert isinstance(back.box, tuple) and isinstance(back.mask_shape, tuple)
    assert np.array_equal(decode_segment_prototype(encode_segment(seg)), seg.prototype)


def test_an_unlabelled_segment_round_trips_with_its_empty_label_and_zero_score():
    seg = _segment()
    seg.label, seg.label_score = "", 0.0  # the label bank did not cover it (spml.label_vote)
    back = decode_segment(encode_segment(seg))
    assert (back.label, back.label_score) == ("", 0.0) and back == seg


def test_segment_equality_sees_prototype_changes():
    seg, other = _segment(), _segment()
    other.prototype = other.prototype.copy()
    other.prototype[0] += 1e-3
    assert seg != other


def test_image_and_meta_round_trip():
    image = ImageRecord("a", "file:///x/a.png", 320, 240, "ab" * 32, [5, 6, 7])
    assert decode_image(encode_image(image)) == image
    meta = IndexMeta("v1", 64, num_images=3, num_segments=9, index_type="IVF16,Flat",
                     generation=7, next_segment_id=10)
    assert decode_meta(encode_meta(meta)) == meta


def test_values_are_msgpack_envelopes_with_a_schema_version_not_pickle():
    data = encode_segment(_segment())
    assert not data.startswith(b"\x80")  # pickle protocol 2+ opcode
    kind, version, payload = msgpack.unpackb(data, raw=False)
    assert (kind, version) == ("segment", records.SEGMENT_SCHEMA_VERSION)
    assert payload["label"] == "cat"


def test_unknown_schema_version_is_refused_clearly():
    data = msgpack.packb(["segment", 99, {}], use_bin_type=True)
    with pytest.raises(IndexStoreError, match="schema version 99"):
        decode_segment(data)


def test_wrong_kind_and_garbage_are_refused():
    with pytest.raises(IndexStoreError, match="expected a segment record"):
        decode_segment(encode_image(ImageRecord("a", "u", 1, 1, "0" * 64)))
    with pytest.raises(IndexStoreError, match="corrupt"):
        decode_meta(b"\xc1\x00garbage")
    with pytest.raises(IndexStoreError, match="envelope"):
        decode_meta(msgpack.packb({"not": "a list"}))
