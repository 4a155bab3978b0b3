"""The Segment RPC's logic: one image -> segment map, label map and per-segment facts.

The image is segmented exactly as the indexer segments corpus images (at its decoded size,
longest side bounded); the maps are then brought back to the size of the image as sent, so a
client can overlay them without knowing the indexer's settings. Boxes are mapped through the
same nearest-neighbour index maps, which are monotonic, so they stay tight.

What comes back is a level of the image's region hierarchy (`spml.hierarchy`): by default the
region level (`SegmenterConfig.region_height`); with `num_segments` > 0 the cut with that many
regions, or every fine segment when the image has fewer (the k-means grid is the server's,
whatever the request: asking for more segments than it makes returns its fine level).

Map values: segment map (16-bit) 0..n-1, NO_SEGMENT for pixels of a segment the tiny-segment
rule dropped (rare); label map (8-bit) index into `labels`, NO_LABEL where there is none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segsearch.spml.segmenter import upsample_nearest
from segsearch.service.analysis import ImageAnalyzer, to_original_size

NO_SEGMENT = 65535
NO_LABEL = 255


@dataclass
class SegmentFacts:
    index: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 end-exclusive, in the image as sent
    area_fraction: float
    label: str
    label_score: float


@dataclass
class Segmentation:
    segment_map: np.ndarray  # (H, W) uint16
    label_map: np.ndarray  # (H, W) uint8
    labels: list[str]
    segments: list[SegmentFacts]
    width: int
    height: int


def segment_request(analyzer: ImageAnalyzer, data: bytes, num_segments: int = 0) -> Segmentation:
    image = analyzer.decode(data)
    result = analyzer.segment(image)
    level = result.regions if num_segments == 0 else analyzer.regions(result, num_segments)
    width, height = image.original_size
    decoded_h, decoded_w = result.shape
    labels = list(analyzer.class_names)
    for segment in level.segments:
        if segment.label and segment.label not in labels:
            labels.append(segment.label)
    if len(labels) > NO_LABEL:
        raise ValueError(f"{len(labels)} classes do not fit an 8-bit label map")
    full = to_original_size(level.label_map, (width, height))
    segment_map = np.where(full >= 0, full, NO_SEGMENT).astype(np.uint16)
    class_of_segment = np.array([labels.index(s.label) if s.label else NO_LABEL for s in level.segments]
                                + [NO_LABEL], dtype=np.uint8)  # last entry: NO_SEGMENT pixels
    label_map = class_of_segment[np.where(full >= 0, full, len(level.segments))]
    rows = _index_map(decoded_h, height)
    cols = _index_map(decoded_w, width)
    facts = [SegmentFacts(s.index, _map_box(s.box, rows, cols), s.area_fraction, s.label, s.label_score)
             for s in level.segments]
    return Segmentation(segment_map, label_map, labels, facts, width, height)


def _index_map(low: int, high: int) -> np.ndarray:
    """For each of `high` output pixels, the input pixel it copies (monotonic), as upsampled."""
    return upsample_nearest(np.arange(low).reshape(low, 1), high, 1)[:, 0]


def _map_box(box: tuple[int, int, int, int], rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (int(np.searchsorted(cols, x0)), int(np.searchsorted(rows, y0)),
            int(np.searchsorted(cols, x1)), int(np.searchsorted(rows, y1)))
