"""Records of the LMDB metadata store and their versioned msgpack encoding.

Why msgpack and not pickle: an index directory is data that may come from elsewhere;
unpickling it would run code. Every encoded value is the msgpack array
`[kind, schema_version, {field: value}]`, so a reader can refuse a record written by a newer
segsearch with a clear message instead of misreading it, and fields can be added later
under a new schema version.

The segment prototype (the unit-norm `(D,)` float32 vector that FAISS indexes) is stored in
the segment record too: LMDB is the source of truth from which the FAISS index can always be
rebuilt after a crash or a lost/corrupt index file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from segsearch.errors import IndexStoreError

SEGMENT_SCHEMA_VERSION = 1
IMAGE_SCHEMA_VERSION = 1
META_SCHEMA_VERSION = 1

# Version of the index directory layout (LMDB sub-databases + FAISS file container).
FORMAT_VERSION = 1
LEVEL_FINE, LEVEL_REGION = 0, 1  # SegmentRecord.level
LEVEL_NAMES = ("fine", "region")


@dataclass(eq=False)
class SegmentRecord:
    """One segment of one image.

    `segment_id` is assigned by the store when the segment is added (pass 0 before that).
    `box` is `(x0, y0, x1, y1)` in pixels of the image as indexed, end-exclusive.
    `mask_rle` / `mask_shape` are the mask in `rle.encode_mask` format, shape `(H, W)`.
    `prototype` is the unit-norm embedding `(D,)`, float32.
    `level`: LEVEL_FINE (a k-means segment) or LEVEL_REGION (a region of the image's hierarchy,
    the union of its fine segments). A fine segment's parent is the region it lies in:
    `parent_index` is that region's position in its image's list of segments as written
    (-1: none), and `parent_id` its segment id (0: none), which the store fills in from
    `parent_index` when it assigns ids. Records of indexes written before levels read as fine
    segments without parent.
    """

    segment_id: int
    image_id: str
    box: tuple[int, int, int, int]
    area_fraction: float
    mask_rle: list[int]
    mask_shape: tuple[int, int]
    label: str
    label_score: float
    model_version: str
    prototype: np.ndarray
    level: int = 0
    parent_index: int = -1
    parent_id: int = 0

    def __post_init__(self) -> None:
        self.segment_id = int(self.segment_id)
        self.level, self.parent_index, self.parent_id = int(self.level), int(self.parent_index), int(self.parent_id)
        if self.level not in (LEVEL_FINE, LEVEL_REGION):
            raise ValueError(f"level must be {LEVEL_FINE} (fine) or {LEVEL_REGION} (region), got {self.level}")
        self.box = tuple(int(v) for v in self.box)  # type: ignore[assignment]
        self.mask_shape = tuple(int(v) for v in self.mask_shape)  # type: ignore[assignment]
        self.mask_rle = [int(v) for v in self.mask_rle]
        self.area_fraction = float(self.area_fraction)
        self.label_score = float(self.label_score)
        self.prototype = np.asarray(self.prototype, dtype=np.float32).reshape(-1)
        if len(self.box) != 4 or len(self.mask_shape) != 2:
            raise ValueError("box must be (x0, y0, x1, y1) and mask_shape (H, W)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SegmentRecord):
            return NotImplemented
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        proto_a, proto_b = mine.pop("prototype"), theirs.pop("prototype")
        return mine == theirs and np.array_equal(proto_a, proto_b)


@dataclass
class ImageRecord:
    """One indexed image; `segment_ids` is filled by the store when the image is added."""

    image_id: str
    uri: str
    width: int
    height: int
    sha256: str
    segment_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.width, self.height = int(self.width), int(self.height)
        self.segment_ids = [int(v) for v in self.segment_ids]


@dataclass
class IndexMeta:
    """The one meta record of an index.

    `generation` counts committed LMDB write transactions that changed the segment set; the
    FAISS file records the generation it reflects, which is how a lagging file is detected.
    `next_segment_id` is the id counter: ids are allocated upwards and never reused, so a
    stale FAISS entry can never be mistaken for a newer segment.
    `has_regions` tells a search whose level is left to the server that region-level segments
    exist (indexes written before levels hold fine segments only); `region_table` that the
    metadata store's table of region ids is complete (false in an index written before the
    table: a writer fills it on open, a reader filters records instead).
    `index_type` is the index spec asked for at creation ("auto", "flat", "hnsw", "ivf" or a
    faiss factory string); the concrete FAISS type is in the FAISS file.
    """

    model_version: str
    embedding_dim: int
    num_images: int = 0
    num_segments: int = 0
    index_type: str = "auto"
    generation: int = 0
    format_version: int = FORMAT_VERSION
    next_segment_id: int = 1
    has_regions: bool = False  # set once a region-level segment is written (never cleared)
    region_table: bool = False  # the `regions` table lists every region-level segment


def _pack(kind: str, version: int, payload: dict[str, Any]) -> bytes:
    return msgpack.packb([kind, version, payload], use_bin_type=True)


def _unpack(kind: str, supported: int, data: bytes) -> dict[str, Any]:
    """Check the `[kind, version, payload]` envelope and return the payload."""
    try:
        value = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several types for garbage input
        raise IndexStoreError(f"corrupt {kind} record in the metadata store: {exc}") from exc
    if not (isinstance(value, list) and len(value) == 3 and isinstance(value[2], dict)):
        raise IndexStoreError(f"corrupt {kind} record in the metadata store (bad envelope)")
    found_kind, version, payload = value
    if found_kind != kind:
        raise IndexStoreError(f"expected a {kind} record but found a {found_kind!r} record")
    if version != supported:
        raise IndexStoreError(
            f"{kind} record has schema version {version}; this segsearch reads version "
            f"{supported}. Use the segsearch release that wrote the index, or rebuild it."
        )
    return payload


def _fields(record) -> dict:
    """A flat record's fields by name: what `dataclasses.asdict` gives for these records (no
    nested dataclasses), without its deep copy of every mask run and of the prototype, which
    was most of a live commit's CPU time."""
    return {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}


def encode_segment(record: SegmentRecord) -> bytes:
    payload = _fields(record)
    payload["prototype"] = record.prototype.astype("<f4").tobytes()
    return _pack("segment", SEGMENT_SCHEMA_VERSION, payload)


def decode_segment(data: bytes) -> SegmentRecord:
    payload = _unpack("segment", SEGMENT_SCHEMA_VERSION, data)
    payload["prototype"] = np.frombuffer(payload["prototype"], dtype="<f4").astype(np.float32)
    return SegmentRecord(**payload)


def decode_segment_prototype(data: bytes) -> np.ndarray:
    """Only the `(D,)` prototype of an encoded segment (used to rebuild FAISS)."""
    payload = _unpack("segment", SEGMENT_SCHEMA_VERSION, data)
    return np.frombuffer(payload["prototype"], dtype="<f4")


def encode_image(record: ImageRecord) -> bytes:
    return _pack("image", IMAGE_SCHEMA_VERSION, _fields(record))


def decode_image(data: bytes) -> ImageRecord:
    return ImageRecord(**_unpack("image", IMAGE_SCHEMA_VERSION, data))


def encode_meta(meta: IndexMeta) -> bytes:
    return _pack("meta", META_SCHEMA_VERSION, dataclasses.asdict(meta))


def decode_meta(data: bytes) -> IndexMeta:
    return IndexMeta(**_unpack("meta", META_SCHEMA_VERSION, data))
