"""Logic results -> protobuf messages (and proto boxes -> logic boxes). No decisions here."""
from __future__ import annotations

import numpy as np

from segsearch.indexer.records import LEVEL_FINE, LEVEL_REGION, ImageRecord, SegmentRecord
from segsearch.service._generated import segment_search_pb2 as pb
from segsearch.service.pngs import encode_label_map_png, encode_mask_png, encode_rle_mask_png, encode_segment_map_png
from segsearch.service.regions import Box
from segsearch.service.errors import InvalidArgument
from segsearch.service.search import ANY_LEVEL, Hit
from segsearch.service.segment_rpc import Segmentation
from segsearch.service.uris import shown_uri


def box_message(box) -> pb.Box:
    x0, y0, x1, y1 = (int(v) for v in box)
    return pb.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def box_from_message(message: pb.Box) -> Box:
    return Box(message.x0, message.y0, message.x1, message.y1)


_LEVEL_MESSAGES = {LEVEL_FINE: pb.LEVEL_FINE, LEVEL_REGION: pb.LEVEL_REGION}
_REQUESTED_LEVELS = {pb.LEVEL_DEFAULT: None, pb.LEVEL_FINE: LEVEL_FINE, pb.LEVEL_REGION: LEVEL_REGION,
                     pb.LEVEL_ANY: ANY_LEVEL}


def level_message(level: int) -> int:
    """A record's level (`indexer.records` LEVEL_*) -> pb.Level."""
    return _LEVEL_MESSAGES[level]


def requested_level(level: int) -> int | None:
    """SearchRequest.level -> the `search.resolve_levels` argument; INVALID_ARGUMENT for a
    number the contract does not define."""
    if level not in _REQUESTED_LEVELS:
        raise InvalidArgument(f"level {level} is not a Level (LEVEL_DEFAULT, LEVEL_FINE, LEVEL_REGION, LEVEL_ANY)")
    return _REQUESTED_LEVELS[level]


def index_levels(has_regions: bool) -> list[int]:
    """GetInfo levels of an index (one written before levels holds fine segments only)."""
    return [pb.LEVEL_FINE, pb.LEVEL_REGION] if has_regions else [pb.LEVEL_FINE]


def default_level(has_regions: bool) -> int:
    """What LEVEL_DEFAULT means on an index (`search.resolve_levels`)."""
    return pb.LEVEL_REGION if has_regions else pb.LEVEL_FINE


def hit_message(hit: Hit, include_mask: bool, image_uris: str) -> pb.Hit:
    segment, image = hit.segment, hit.image
    return pb.Hit(
        segment_id=hit.segment_id, image_id=segment.image_id, image_uri=shown_uri(image, image_uris),
        score=hit.score, box=box_message(segment.box), label=segment.label,
        label_score=segment.label_score, area_fraction=segment.area_fraction,
        mask_png=encode_rle_mask_png(segment.mask_rle, segment.mask_shape) if include_mask else b"",
        image_width=segment.mask_shape[1], image_height=segment.mask_shape[0],
        level=level_message(segment.level), parent_segment_id=segment.parent_id,
    )


def search_response(hits: list[Hit], include_masks: bool, query_mask: np.ndarray | None,
                    model_version: str, image_uris: str) -> pb.SearchResponse:
    return pb.SearchResponse(
        hits=[hit_message(hit, include_masks, image_uris) for hit in hits], model_version=model_version,
        query_mask_png=encode_mask_png(query_mask) if include_masks and query_mask is not None else b"",
    )


def segment_record_message(segment: SegmentRecord, image: ImageRecord | None, image_uris: str) -> pb.SegmentRecord:
    return pb.SegmentRecord(
        segment_id=segment.segment_id, image_id=segment.image_id, image_uri=shown_uri(image, image_uris),
        box=box_message(segment.box), area_fraction=segment.area_fraction, label=segment.label,
        label_score=segment.label_score, mask_png=encode_rle_mask_png(segment.mask_rle, segment.mask_shape),
        model_version=segment.model_version, image_width=segment.mask_shape[1],
        image_height=segment.mask_shape[0], level=level_message(segment.level),
        parent_segment_id=segment.parent_id,
    )


def segment_response(result: Segmentation, model_version: str) -> pb.SegmentResponse:
    return pb.SegmentResponse(
        segment_map_png=encode_segment_map_png(result.segment_map),
        label_map_png=encode_label_map_png(result.label_map),
        labels=result.labels,
        segments=[pb.SegmentInfo(index=s.index, box=box_message(s.box), area_fraction=s.area_fraction,
                                 label=s.label, label_score=s.label_score) for s in result.segments],
        width=result.width, height=result.height, model_version=model_version,
    )
