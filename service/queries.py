"""A search request's query -> the unit-norm vector to search with (see `regions.py`).

Cheap checks come first (a region with no shape, an empty box) so that a bad request costs
no decoding; bounds need the image's size, so they follow the decode; the model runs last.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segsearch.indexer.store_api import ReadableStore
from segsearch.service import regions
from segsearch.service.analysis import CachedRegions, ImageAnalyzer, to_original_size
from segsearch.service.errors import InvalidArgument
from segsearch.service.pngs import decode_mask_png
from segsearch.service.search import get_segment


@dataclass(frozen=True)
class RegionSpec:
    """Exactly one of mask_png, box, point (the proto's `Region.shape` oneof)."""

    mask_png: bytes | None = None
    box: regions.Box | None = None
    point: tuple[int, int] | None = None  # (x, y)


@dataclass
class QueryVector:
    """vector: (D,) unit norm; mask: the region used, (H, W) bool at the image as sent, or None."""

    vector: np.ndarray
    mask: np.ndarray | None = None


def region_query(analyzer: ImageAnalyzer, image_data: bytes, region: RegionSpec) -> QueryVector:
    """Embed the whole image, then reduce the region to one vector."""
    shapes = [s for s in (region.mask_png, region.box, region.point) if s is not None]
    if len(shapes) != 1:
        raise InvalidArgument("region must set exactly one of mask_png, box or point")
    if region.box is not None:
        regions.check_box_not_empty(region.box)
    if region.box is not None or region.point is not None:  # both pick a region of the segmentation
        return _region_pick_query(analyzer, image_data, region)
    with analyzer.embedding_turn(image_data) as cached:
        if cached is not None:  # a further region of an image embedded lately: no decode, no forward
            size, embeddings = cached.original_size, cached.embeddings
        else:
            image = analyzer.decode(image_data)
            size = image.original_size
            embeddings = None
        mask = decode_mask_png(region.mask_png, size)
        regions.check_mask(mask)
        if embeddings is None:
            embeddings = analyzer.embed(image)
    return _mask_query(analyzer, embeddings, mask)


def _mask_query(analyzer: ImageAnalyzer, embeddings, mask: np.ndarray) -> QueryVector:
    model_size = (analyzer.embed_size, analyzer.embed_size)
    return QueryVector(regions.region_vector(embeddings, mask, model_size), mask)


def _region_pick_query(analyzer: ImageAnalyzer, image_data: bytes, region: RegionSpec) -> QueryVector:
    """A point or a box: a region of the image's region level (cached per image bytes)."""
    level, image = analyzer.regions_of(image_data)
    if region.point is not None:
        return _point_query(level, region.point)
    box_pixels = regions.box_mask(region.box, level.original_size)
    box = regions.coverage_at(box_pixels, level.label_map.shape) >= 0.5
    index = regions.box_region(level.label_map, box)
    if index is not None:
        return _clipped_region_query(level, index, box)
    cached = analyzer.cached_embedding(image_data)  # no region lies mostly inside: the box's pixels
    embeddings = cached.embeddings if cached is not None else analyzer.embed(image or analyzer.decode(image_data))
    return _mask_query(analyzer, embeddings, box_pixels)


def _point_query(level: CachedRegions, point: tuple[int, int]) -> QueryVector:
    """The region containing the point, in the cut points use (`regions.point_region`)."""
    x, y = point
    regions.check_point(x, y, level.original_size)
    row, col = regions.point_in_model(x, y, level.original_size, level.label_map.shape)
    found = regions.point_region(level.leaf_map, level.leaf_sums, level.leaf_point_regions, row, col)
    if found is None:
        raise InvalidArgument(f"the point ({x},{y}) lies in no segment (its segment was too small "
                              "and dropped); pick a point inside a larger region")
    vector, mask = found
    return QueryVector(vector, to_original_size(mask, level.original_size))


def _clipped_region_query(level: CachedRegions, index: int, box: np.ndarray) -> QueryVector:
    """Region `index` inside the box `(H', W')` bool: its vector and its mask as sent."""
    vector = regions.clipped_region_vector(level.leaf_map, level.leaf_sums, level.leaf_regions, index, box)
    return QueryVector(vector, to_original_size((level.label_map == index) & box, level.original_size))


def segment_id_query(store: ReadableStore, segment_id: int, model_version: str) -> QueryVector:
    """The stored prototype of a segment (NOT_FOUND if unknown)."""
    return QueryVector(get_segment(store, segment_id, model_version).prototype)


# A vector this close to unit length is used as sent, so that a stored prototype relayed by the
# router searches bit-identically to a segment-id query (re-dividing would move the last bits).
UNIT_TOLERANCE = 1e-6


def embedding_query(values, embedding_dim: int) -> QueryVector:
    """A raw query vector `(D,)` (proto `Embedding.values`) -> unit norm; INVALID_ARGUMENT unless
    it has the index's dimension, finite values and a non-zero norm."""
    vector = np.asarray(values, dtype=np.float32).reshape(-1)
    if vector.size != embedding_dim:
        raise InvalidArgument(f"embedding has {vector.size} values but the index's embedding_dim is "
                              f"{embedding_dim} (see GetInfo)")
    if not np.all(np.isfinite(vector)):
        raise InvalidArgument("embedding has non-finite values (NaN or infinity)")
    wide = vector.astype(np.float64)  # float32 squares overflow above ~1e19 and vanish below ~1e-23
    norm = float(np.linalg.norm(wide))
    if norm == 0.0:
        raise InvalidArgument("embedding is all zeros; it has no direction to search in")
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        vector = (wide / norm).astype(np.float32)
    return QueryVector(vector)
