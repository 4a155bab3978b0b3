from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Level(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEVEL_DEFAULT: _ClassVar[Level]
    LEVEL_FINE: _ClassVar[Level]
    LEVEL_REGION: _ClassVar[Level]
    LEVEL_ANY: _ClassVar[Level]
LEVEL_DEFAULT: Level
LEVEL_FINE: Level
LEVEL_REGION: Level
LEVEL_ANY: Level

class Image(_message.Message):
    __slots__ = ("data", "image_id")
    DATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    image_id: str
    def __init__(self, data: _Optional[bytes] = ..., image_id: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("mask_png", "box", "point")
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    mask_png: bytes
    box: Box
    point: Point
    def __init__(self, mask_png: _Optional[bytes] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., point: _Optional[_Union[Point, _Mapping]] = ...) -> None: ...

class RegionQuery(_message.Message):
    __slots__ = ("image", "region")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    image: Image
    region: Region
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("labels", "exclude_image_ids", "min_area_fraction")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    MIN_AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    exclude_image_ids: _containers.RepeatedScalarFieldContainer[str]
    min_area_fraction: float
    def __init__(self, labels: _Optional[_Iterable[str]] = ..., exclude_image_ids: _Optional[_Iterable[str]] = ..., min_area_fraction: _Optional[float] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("region", "segment_id", "embedding", "top_k", "filter", "include_masks", "min_score", "model_version", "search_effort", "level")
    REGION_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_MASKS_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEARCH_EFFORT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    region: RegionQuery
    segment_id: int
    embedding: Embedding
    top_k: int
    filter: Filter
    include_masks: bool
    min_score: float
    model_version: str
    search_effort: int
    level: Level
    def __init__(self, region: _Optional[_Union[RegionQuery, _Mapping]] = ..., segment_id: _Optional[int] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., include_masks: _Optional[bool] = ..., min_score: _Optional[float] = ..., model_version: _Optional[str] = ..., search_effort: _Optional[int] = ..., level: _Optional[_Union[Level, str]] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, queries: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("segment_id", "image_id", "image_uri", "score", "box", "label", "label_score", "area_fraction", "mask_png", "image_width", "image_height", "level", "parent_segment_id")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SCORE_FIELD_NUMBER: _ClassVar[int]
    AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PARENT_SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    image_id: str
    image_uri: str
    score: float
    box: Box
    label: str
    label_score: float
    area_fraction: float
    mask_png: bytes
    image_width: int
    image_height: int
    level: Level
    parent_segment_id: int
    def __init__(self, segment_id: _Optional[int] = ..., image_id: _Optional[str] = ..., image_uri: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., label: _Optional[str] = ..., label_score: _Optional[float] = ..., area_fraction: _Optional[float] = ..., mask_png: _Optional[bytes] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., level: _Optional[_Union[Level, str]] = ..., parent_segment_id: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "model_version", "query_mask_png")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUERY_MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    model_version: str
    query_mask_png: bytes
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., model_version: _Optional[str] = ..., query_mask_png: _Optional[bytes] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("image", "num_segments")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    image: Image
    num_segments: int
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., num_segments: _Optional[int] = ...) -> None: ...

class SegmentInfo(_message.Message):
    __slots__ = ("index", "box", "area_fraction", "label", "label_score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    box: Box
    area_fraction: float
    label: str
    label_score: float
    def __init__(self, index: _Optional[int] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., area_fraction: _Optional[float] = ..., label: _Optional[str] = ..., label_score: _Optional[float] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("segment_map_png", "label_map_png", "labels", "segments", "width", "height", "model_version")
    SEGMENT_MAP_PNG_FIELD_NUMBER: _ClassVar[int]
    LABEL_MAP_PNG_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    segment_map_png: bytes
    label_map_png: bytes
    labels: _containers.RepeatedScalarFieldContainer[str]
    segments: _containers.RepeatedCompositeFieldContainer[SegmentInfo]
    width: int
    height: int
    model_version: str
    def __init__(self, segment_map_png: _Optional[bytes] = ..., label_map_png: _Optional[bytes] = ..., labels: _Optional[_Iterable[str]] = ..., segments: _Optional[_Iterable[_Union[SegmentInfo, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetSegmentRequest(_message.Message):
    __slots__ = ("segment_id", "include_prototype")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    include_prototype: bool
    def __init__(self, segment_id: _Optional[int] = ..., include_prototype: _Optional[bool] = ...) -> None: ...

class SegmentRecord(_message.Message):
    __slots__ = ("segment_id", "image_id", "image_uri", "box", "area_fraction", "label", "label_score", "mask_png", "model_version", "image_width", "image_height", "prototype", "level", "parent_segment_id")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    AREA_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_SCORE_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PARENT_SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    image_id: str
    image_uri: str
    box: Box
    area_fraction: float
    label: str
    label_score: float
    mask_png: bytes
    model_version: str
    image_width: int
    image_height: int
    prototype: _containers.RepeatedScalarFieldContainer[float]
    level: Level
    parent_segment_id: int
    def __init__(self, segment_id: _Optional[int] = ..., image_id: _Optional[str] = ..., image_uri: _Optional[str] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., area_fraction: _Optional[float] = ..., label: _Optional[str] = ..., label_score: _Optional[float] = ..., mask_png: _Optional[bytes] = ..., model_version: _Optional[str] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., prototype: _Optional[_Iterable[float]] = ..., level: _Optional[_Union[Level, str]] = ..., parent_segment_id: _Optional[int] = ...) -> None: ...

class IndexImageRequest(_message.Message):
    __slots__ = ("image", "uri")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    image: Image
    uri: str
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., uri: _Optional[str] = ...) -> None: ...

class IndexedImage(_message.Message):
    __slots__ = ("image_id", "segment_ids")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    segment_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, image_id: _Optional[str] = ..., segment_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SkippedImage(_message.Message):
    __slots__ = ("image_id", "reason")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    reason: str
    def __init__(self, image_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class IndexImagesResponse(_message.Message):
    __slots__ = ("indexed", "skipped", "num_segments")
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    NUM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    indexed: _containers.RepeatedCompositeFieldContainer[IndexedImage]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedImage]
    num_segments: int
    def __init__(self, indexed: _Optional[_Iterable[_Union[IndexedImage, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedImage, _Mapping]]] = ..., num_segments: _Optional[int] = ...) -> None: ...

class DeleteImagesRequest(_message.Message):
    __slots__ = ("image_ids", "segment_ids")
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    segment_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, image_ids: _Optional[_Iterable[str]] = ..., segment_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DeleteImagesResponse(_message.Message):
    __slots__ = ("deleted_segment_ids", "num_images")
    DELETED_SEGMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    deleted_segment_ids: _containers.RepeatedScalarFieldContainer[int]
    num_images: int
    def __init__(self, deleted_segment_ids: _Optional[_Iterable[int]] = ..., num_images: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_version", "num_segments", "num_images", "embedding_dim", "label_names", "index_type", "faiss_index", "max_top_k", "max_image_pixels", "read_only", "ef_search", "nprobe", "max_search_effort", "max_batch_queries", "levels", "default_level", "faiss_threads")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    FAISS_INDEX_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEARCH_EFFORT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_QUERIES_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LEVEL_FIELD_NUMBER: _ClassVar[int]
    FAISS_THREADS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    num_segments: int
    num_images: int
    embedding_dim: int
    label_names: _containers.RepeatedScalarFieldContainer[str]
    index_type: str
    faiss_index: str
    max_top_k: int
    max_image_pixels: int
    read_only: bool
    ef_search: int
    nprobe: int
    max_search_effort: int
    max_batch_queries: int
    levels: _containers.RepeatedScalarFieldContainer[Level]
    default_level: Level
    faiss_threads: int
    def __init__(self, model_version: _Optional[str] = ..., num_segments: _Optional[int] = ..., num_images: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., label_names: _Optional[_Iterable[str]] = ..., index_type: _Optional[str] = ..., faiss_index: _Optional[str] = ..., max_top_k: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., read_only: _Optional[bool] = ..., ef_search: _Optional[int] = ..., nprobe: _Optional[int] = ..., max_search_effort: _Optional[int] = ..., max_batch_queries: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[Level, str]]] = ..., default_level: _Optional[_Union[Level, str]] = ..., faiss_threads: _Optional[int] = ...) -> None: ...
