"""What a running server holds once loaded: the model (as a `Segmenter`), the index, limits.

Loading checks what must agree before anything is served: the checkpoint's model version
against the index's (the store refuses another version: FAILED_PRECONDITION territory, so
the server does not start), and the index's own segmentation settings (`indexing.json`)
become the server's, so that a query image is decoded and segmented exactly like the
images of the index.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path


from segsearch.indexer.store_api import ReadableStore
from segsearch.indexer.decode import DecodeConfig
from segsearch.indexer.decode_budget import DecodeBudget
from segsearch.indexer.config import IndexSettings
from segsearch.spml.segmenter import Segmenter, SegmenterConfig
from segsearch.indexer.sharded_store import ShardedStore, open_index, read_only_message, settings_dir
from segsearch.service.analysis import ImageAnalyzer
from segsearch.service.embedding_cache import EmbeddingCache
from segsearch.service.config import BatchConfig, ServiceLimits
from segsearch.service.errors import FailedPrecondition
from segsearch.service.updates import IndexUpdater
from segsearch.spml.device import resolve_device
from segsearch.spml.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

@dataclass
class ServiceApp:
    store: ReadableStore  # a sharded layout is served read-only
    analyzer: ImageAnalyzer
    updater: IndexUpdater
    model_version: str
    limits: ServiceLimits
    read_only: bool
    image_uris: str = "relative"  # what clients see of image paths (service/uris.py)

    @classmethod
    def load(cls, index_dir: str | Path, checkpoint_path: str | Path, limits: ServiceLimits | None = None,
             read_only: bool = False, device: str = "cpu", batching: BatchConfig | None = None,
             image_uris: str = "relative", save_every: int | None = None) -> "ServiceApp":
        limits = limits or ServiceLimits()
        checkpoint = load_checkpoint(checkpoint_path)
        version = checkpoint.model_version
        store = open_index(index_dir, version, read_only=read_only, save_every=save_every)
        sharded = isinstance(store, ShardedStore)
        read_only = read_only or sharded
        try:
            decode_config, segmenter_config = index_settings(settings_dir(index_dir), limits)
            model = checkpoint.build_model().to(resolve_device(device))
            # Queries always need the hierarchy (boxes and points pick regions), whatever the index stores.
            segmenter = Segmenter(model, checkpoint.label_bank, dataclasses.replace(segmenter_config, regions=True))
            analyzer = ImageAnalyzer(segmenter, decode_config, batching, DecodeBudget(limits.decode_budget_pixels),
                                     EmbeddingCache(limits.embedding_cache_bytes))
        except BaseException:
            store.close()
            raise
        log.info("serving %s (%d images, %d segments) with model %s", index_dir,
                 store.meta.num_images, store.meta.num_segments, version)
        updater = (_ShardedUpdater if sharded else IndexUpdater)(store, analyzer, version, read_only,
                                                                 segmenter_config.regions)
        return cls(store, analyzer, updater, version, limits, read_only, image_uris)

    def close(self) -> None:
        self.analyzer.close()
        self.store.close()


class _ShardedUpdater(IndexUpdater):
    """Refuses IndexImages/DeleteImages: a sharded layout is served read-only (sharded_store.py)."""

    def _check_writable(self) -> None:
        raise FailedPrecondition(read_only_message(self.store.root))


def index_settings(index_dir: str | Path, limits: ServiceLimits) -> tuple[DecodeConfig, SegmenterConfig]:
    """The index's decode and segmenter settings (defaults if it has none), with the server's
    pixel limit (a guard, not a segmentation setting)."""
    settings = IndexSettings.load(index_dir) or IndexSettings()
    return dataclasses.replace(settings.decode, max_pixels=limits.max_image_pixels), settings.segmenter
