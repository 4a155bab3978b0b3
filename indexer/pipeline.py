"""The indexing job: corpus -> decoded images -> segments -> LMDB + FAISS, resumable.

Flow (one process; the model runs in the main thread):

    corpus items ──► thread pool: read, sha256, decode, resize (decode.py, resize_for_embedding)
                       │  up to `prefetch` images ahead, in corpus order
                       ▼
    main thread: batch of `batch_size` ─► Segmenter.cluster (embed + k-means, on the device)
                       │  k-means ids + per-segment embedding sums
                       ▼
    finisher thread: Segmenter.finish (tiny-segment rule, prototypes, full-size masks, k-NN
                 labels) ─► records ─► every `chunk_size` images ONE `IndexStore.add_images`
                 (one LMDB transaction, then FAISS)

**Overlap**: while the main thread embeds batch i, the decode pool is already decoding the
following images (batch i+1 and beyond) and the finisher thread finishes and stores batch
i-1. Decoding and storing therefore cost no wall time as long as each is faster than the
forward pass (on a GPU the host-side bookkeeping would otherwise dominate); on a CPU they
share the cores with the forward pass. `stage_seconds["wait_decode"]` says how long the main
thread still waited for images; the stage times are summed over threads, so they can add up
to more than the wall time.

**Resumable, exactly once**: before work starts, corpus items whose `image_id` the index
already holds are set aside (`triage`): from the same file (uri) they are not read again (to
re-index a changed file, delete its image first); from another file they are hashed, and
other content under a taken id is skipped as `image_id_taken`, never dropped silently. After decoding, an image whose content (sha256) is already indexed, or
seen earlier in this run, is skipped as a duplicate. The store commits each chunk in one
LMDB transaction before touching FAISS and repairs FAISS from LMDB on open, so after a
`kill -9` at any point, running the same command again indexes exactly the images that
are missing and leaves `IndexStore.verify()` clean.

**Skipped images** (unreadable, empty, not an image, corrupt, too many pixels, duplicate,
image id taken)
are logged with the reason, appended to `OUT/skipped.jsonl` as they happen, and at the
end of a run the file is rewritten (atomically) with one line per image, without images
that have been indexed since. The job goes on.

**Settings**: the segmentation settings (`decode` and `segmenter` configs) are written to
`OUT/indexing.json` when the index is created; continuing or adding to an index with other
settings is refused, so one index never mixes segmentations. The model version is checked
by the store: a checkpoint of another version is refused with both versions named.

Sizes stored: `ImageRecord.width/height` are the file's size (after EXIF orientation);
masks, boxes and `mask_shape` are in the pixels of the image as indexed (longest side
bounded by `max_side`), so `width / mask_shape[1]` maps a box back onto the file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from segsearch.durable import atomic_write, remove_stale_temp_files
from segsearch.errors import IndexStoreError
from segsearch.indexer.config import SETTINGS_FILE, IndexConfig, IndexSettings
from segsearch.indexer.corpus import CorpusItem, read_corpus
from segsearch.indexer.decode import DecodedImage, SkippedImage, SkipReason, decode_file
from segsearch.indexer.index_store import LMDB_DIR, IndexStore
from segsearch.indexer.records import LEVEL_FINE, LEVEL_REGION, ImageRecord, SegmentRecord
from segsearch.spml.segmenter import (
    ClusteredBatch,
    ImageSegments,
    Segmenter,
    StageTimes,
    label_map_rles,
    resize_for_embedding,
)
from segsearch.spml.device import resolve_device
from segsearch.spml.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

SKIPPED_FILE = "skipped.jsonl"
@dataclass
class IndexSummary:
    """What a run did (counts of this run) and what the index holds afterwards."""

    out_dir: str
    model_version: str
    images_indexed: int = 0
    segments_indexed: int = 0
    skipped: int = 0
    already_indexed: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    index_images: int = 0
    index_segments: int = 0
    skipped_path: str = ""

    @property
    def images_per_second(self) -> float:
        return self.images_indexed / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        stages = ", ".join(f"{name} {sec:.2f}s" for name, sec in self.stage_seconds.items())
        lines = [
            f"indexed {self.images_indexed} images ({self.segments_indexed} segments) in "
            f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s); skipped {self.skipped}"
            + (f" (listed in {self.skipped_path})" if self.skipped else "")
            + f"; {self.already_indexed} already indexed",
            f"index {self.out_dir}: {self.index_images} images, {self.index_segments} segments, "
            f"model version {self.model_version}",
            f"time per stage: {stages}",
        ]
        return "\n".join(lines)


@dataclass
class _Prepared:
    """One decoded corpus item (worker output)."""

    item: CorpusItem
    result: DecodedImage | SkippedImage
    resized: np.ndarray | None
    seconds: float


def index_corpus(corpus: str | Path | Sequence[CorpusItem], checkpoint_path: str | Path,
                 out_dir: str | Path, config: IndexConfig | None = None) -> IndexSummary:
    """Index `corpus` (a folder, a JSONL manifest, or items) with the checkpoint into `out_dir`.

    Creates the index, or continues / adds to the one there (see the module docstring).
    """
    config = config or IndexConfig()
    started = time.perf_counter()
    device = resolve_device(config.device)
    items = list(corpus) if isinstance(corpus, (list, tuple)) else read_corpus(corpus)
    checkpoint = load_checkpoint(checkpoint_path)
    out = Path(out_dir)
    store = open_or_create_index(out, checkpoint, config)
    try:
        _remove_stale_temp_files(out)  # we hold the writer lock: nobody else is writing
        _check_settings(out, store, config)
        report = SkipReport(out / SKIPPED_FILE)
        todo, already, taken = triage(items, store)
        summary = IndexSummary(str(out), checkpoint.model_version, already_indexed=len(already),
                               skipped=len(taken), skipped_path=str(out / SKIPPED_FILE))
        for item, detail in taken:
            report.add(item, SkipReason.IMAGE_ID_TAKEN, detail)
        if already:
            log.info("%d of %d images are already in %s; indexing the other %d",
                     len(already), len(items), out, len(todo) + len(taken))
        if todo:
            segmenter = Segmenter(checkpoint.build_model().to(device),
                                  checkpoint.label_bank, config.segmenter)
            _Run(store, segmenter, config, report, summary, checkpoint.model_version).process(todo)
        report.compact(store)
        meta = store.meta
        summary.index_images, summary.index_segments = meta.num_images, meta.num_segments
    finally:
        store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def triage(items: Sequence[CorpusItem], store: IndexStore):
    """Split `items` by the identity rule: an image is its image id (the path relative to the
    corpus root, or the manifest's image_id). -> (to index, already indexed, [(item, why)] whose
    id is taken by other content).

    An id already in the index names the same image when the stored record has the item's
    uri (a re-run or resume: nothing is read) or, for another uri, the same content (sha256 of
    the file). Otherwise the id is taken: the new image is refused with a reason in
    skipped.jsonl, never dropped without a word (two camera folders both holding IMG_0001.jpg
    must be indexed from their parent folder, or given ids in a manifest)."""
    todo, already, taken = [], [], []
    for item in items:
        if not store.has_image(item.image_id):
            todo.append(item)
            continue
        stored = store.get_image(item.image_id)
        if stored.uri == item.uri or file_sha256(item.uri) == stored.sha256:
            already.append(item)
            continue
        taken.append((item, f"image id {item.image_id!r} is already indexed with other content (from "
                            f"{stored.uri}); index the folders from a common parent, give the image its own "
                            "image_id in a manifest, or delete the old image first"))
    return todo, already, taken


def file_sha256(path: str) -> str | None:
    """sha256 of a file's bytes (the store's content key), None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def open_or_create_index(out: Path, checkpoint: Checkpoint, config: IndexConfig) -> IndexStore:
    """The index at `out` (model version checked by the store), or a new one there."""
    version = checkpoint.model_version
    if (out / LMDB_DIR / "data.mdb").exists():
        log.info("continuing the index at %s", out)
        return IndexStore.open(out, version, save_every=config.save_every, map_size=config.map_size)
    if config.must_exist:
        raise IndexStoreError(f"no segsearch index at {out} to add to or resume; "
                          "create one with `segsearch index CORPUS --model CKPT --out DIR`")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IndexStoreError(f"{out} exists and is not a segsearch index; choose a new --out directory")
    kwargs = {} if config.map_size is None else {"map_size": config.map_size}
    store = IndexStore.create(out, version, checkpoint.config.output_dim, config.index_type,
                              save_every=config.save_every, first_segment_id=config.first_segment_id, **kwargs)
    IndexSettings.of(config).save(out)
    return store


def _check_settings(out: Path, store: IndexStore, config: IndexConfig) -> None:
    """Refuse to extend an index with other segmentation settings or another index type."""
    wanted = IndexSettings.of(config)
    stored = IndexSettings.load(out)
    if stored is None:  # a crash between creating the index and writing the file
        wanted.save(out)
        stored = wanted
    differences = wanted.differences(stored)
    if config.index_type != store.meta.index_type:
        differences.append(f"index_type={config.index_type!r} (index: {store.meta.index_type!r})")
    if differences:
        raise IndexStoreError(f"the index at {out} was built with other settings: {'; '.join(differences)}; "
                          "use the index's settings (omit the flags) or index into a new --out directory")


class SkipReport:
    """`skipped.jsonl`: one JSON line per skipped image (image_id, uri, reason, detail)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, item: CorpusItem, reason: SkipReason, detail: str) -> None:
        log.warning("skipped %s (%s): %s", item.image_id, reason.value, detail)
        line = json.dumps({"image_id": item.image_id, "uri": item.uri, "reason": reason.value, "detail": detail})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def entries(self) -> list[dict]:
        """The entries on file; a line cut short by a crash is ignored."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "image_id" in entry:
                entries.append(entry)
        return entries

    def compact(self, store: IndexStore) -> int:
        """Keep the latest entry per image, drop images indexed since; returns the count."""
        latest = {entry["image_id"]: entry for entry in self.entries()}
        kept = [entry for image_id, entry in latest.items()
                if not store.has_image(image_id) or _still_taken(store, entry)]
        if not kept and not self.path.exists():
            return 0
        text = "".join(json.dumps(entry) + "\n" for entry in kept)
        atomic_write(self.path, text.encode("utf-8"))
        return len(kept)


def _still_taken(store: IndexStore, entry: dict) -> bool:
    """An `image_id_taken` entry stays while the id holds the other file's image."""
    if entry.get("reason") != SkipReason.IMAGE_ID_TAKEN.value:
        return False
    return store.get_image(entry["image_id"]).uri != entry.get("uri")


class _Run:
    """One pass over the items still to index (the loop of `index_corpus`)."""

    def __init__(self, store: IndexStore, segmenter: Segmenter, config: IndexConfig, report: SkipReport,
                 summary: IndexSummary, model_version: str) -> None:
        self.store, self.segmenter, self.config = store, segmenter, config
        self.report, self.summary, self.model_version = report, summary, model_version
        self.times = StageTimes()
        self.wait_decode = 0.0
        self.pending: list[tuple[ImageRecord, list[SegmentRecord]]] = []
        self.pending_items: dict[str, CorpusItem] = {}
        self.seen_sha: dict[str, str] = {}
        self.chunks = 0
        self.bar: tqdm | None = None
        self.workers = config.decode_workers or min(4, os.cpu_count() or 1)
        self.lock = threading.Lock()

    def process(self, todo: list[CorpusItem]) -> None:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher, \
                logging_redirect_tqdm(), \
                tqdm(total=len(todo), unit="img", desc="index", disable=not self.config.progress,
                     dynamic_ncols=True, smoothing=0.05) as self.bar:
            batch: list[_Prepared] = []
            in_flight: collections.deque[tuple[Future, int]] = collections.deque()
            decoded = self._decoded(pool, todo)
            try:
                for prepared in decoded:
                    if self._accept(prepared):
                        batch.append(prepared)
                    else:
                        self._advance(1)
                    if len(batch) == self.config.batch_size:
                        self._cluster_batch(batch, finisher, in_flight)
                        batch = []
                if batch:
                    self._cluster_batch(batch, finisher, in_flight)
                while in_flight:
                    self._collect(in_flight)
            finally:
                decoded.close()  # cancels the decoding not started yet
            self._commit()
        self.summary.stage_seconds = {**self.times.as_dict(), "wait_decode": self.wait_decode}

    def _decoded(self, pool: ThreadPoolExecutor, todo: list[CorpusItem]) -> Iterator[_Prepared]:
        """Decode in the pool, `prefetch` items ahead of the consumer, yielding in order."""
        prefetch = 2 * self.config.batch_size + self.workers
        pending: collections.deque[Future] = collections.deque()
        items = iter(todo)
        try:
            for item in items:
                pending.append(pool.submit(_prepare, item, self.config))
                if len(pending) >= prefetch:
                    yield self._next(pending)
            while pending:
                yield self._next(pending)
        finally:
            for future in pending:
                future.cancel()

    def _next(self, pending: collections.deque) -> _Prepared:
        start = time.perf_counter()
        prepared = pending.popleft().result()
        self.wait_decode += time.perf_counter() - start
        self.times.decode += prepared.seconds
        return prepared

    def _accept(self, prepared: _Prepared) -> bool:
        """True for a decoded image to index; skips (reported) failures and duplicates."""
        item, result = prepared.item, prepared.result
        if isinstance(result, SkippedImage):
            self._skip(item, result.reason, result.detail)
            return False
        owner = self.seen_sha.get(result.sha256) or self.store.image_id_for_sha256(result.sha256)
        if owner is not None:
            self._skip(item, SkipReason.DUPLICATE, f"same content (sha256) as image {owner!r}")
            return False
        self.seen_sha[result.sha256] = item.image_id
        return True

    def _skip(self, item: CorpusItem, reason: SkipReason, detail: str) -> None:
        with self.lock:  # called from the main and the finisher thread
            self.report.add(item, reason, detail)
            self.summary.skipped += 1

    def _cluster_batch(self, batch: list[_Prepared], finisher: ThreadPoolExecutor,
                       in_flight: collections.deque) -> None:
        """Main thread: embed + k-means this batch, hand the rest to the finisher thread, and
        wait for the previous batch's finish, so at most one finishes while the next embeds."""
        clustered = self.segmenter.cluster([p.result.pixels for p in batch], [p.resized for p in batch],
                                           self.times)
        in_flight.append((finisher.submit(self._finish_batch, batch, clustered), len(batch)))
        while len(in_flight) > 1:
            self._collect(in_flight)

    def _collect(self, in_flight: collections.deque) -> None:
        future, count = in_flight.popleft()
        future.result()  # re-raises a failure of the finisher thread here
        self._advance(count)

    def _finish_batch(self, batch: list[_Prepared], clustered: ClusteredBatch) -> None:
        """Finisher thread: segments -> records -> a store commit whenever a chunk is full.
        One thread, so chunks are committed in corpus order."""
        segmented = self.segmenter.finish(clustered, self.times)
        with self.times.measure("store"):
            for prepared, segments in zip(batch, segmented):
                self.pending.append(self._records(prepared, segments))
                self.pending_items[prepared.item.image_id] = prepared.item
        while len(self.pending) >= self.config.chunk_size:  # a batch may fill several chunks
            self._commit(self.config.chunk_size)

    def _records(self, prepared: _Prepared, segments: ImageSegments) -> tuple[ImageRecord, list[SegmentRecord]]:
        item = prepared.item
        return image_records(item.image_id, item.uri, prepared.result, segments, self.model_version)

    def _commit(self, limit: int | None = None) -> None:
        """Commit the first `limit` pending images (all when None) in one store transaction."""
        size = len(self.pending) if limit is None else min(limit, len(self.pending))
        chunk, self.pending = self.pending[:size], self.pending[size:]
        if not chunk:
            return
        with self.times.measure("store"):
            result = self.store.add_images(chunk)
        for image_id, reason in result.skipped:  # raced with another writer or a duplicate id
            self._skip(self.pending_items[image_id], SkipReason.DUPLICATE, reason)
        self.summary.images_indexed += len(result.image_ids)
        self.summary.segments_indexed += len(result.segment_ids)
        self.chunks += 1
        log.info("committed chunk %d: %d images, %d segments (this run: %d images, %d segments)",
                 self.chunks, len(result.image_ids), len(result.segment_ids),
                 self.summary.images_indexed, self.summary.segments_indexed)
        for image, _ in chunk:
            self.pending_items.pop(image.image_id, None)

    def _advance(self, count: int) -> None:
        if self.bar is not None:
            segmented = self.summary.segments_indexed + sum(len(records) for _, records in self.pending)
            self.bar.set_postfix(segments=segmented, skipped=self.summary.skipped, refresh=False)
            self.bar.update(count)


def image_records(image_id: str, uri: str, decoded: DecodedImage, segments: ImageSegments,
                  model_version: str, with_regions: bool = True) -> tuple[ImageRecord, list[SegmentRecord]]:
    """The store records of one segmented image; the service's live updates use it too, so
    both write paths store identical records. Ids are assigned by the store (0 here).

    The fine segments come first (positions 0..n-1), then the regions of the default cut of
    the image's hierarchy (n..n+r-1, `ImageSegments.regions`), each fine segment naming the
    region it lies in as its parent. Without regions (`with_regions` False, or segments
    without a hierarchy) the fine segments have no parent."""
    shape = segments.shape
    regions = segments.regions if with_regions else None
    fine_parents = (len(segments.segments) + regions.leaf_regions if regions is not None
                    else np.full(len(segments.segments), -1))
    records = [
        SegmentRecord(0, image_id, seg.box, seg.area_fraction, rle, shape, seg.label,
                      seg.label_score, model_version, seg.prototype, LEVEL_FINE, int(parent))
        for seg, rle, parent in zip(segments.segments, segments.masks_rle(), fine_parents, strict=True)
    ]
    if regions is not None:
        rles = label_map_rles(regions.label_map, len(regions.segments))
        records += [SegmentRecord(0, image_id, seg.box, seg.area_fraction, rle, shape, seg.label,
                                  seg.label_score, model_version, seg.prototype, LEVEL_REGION)
                    for seg, rle in zip(regions.segments, rles, strict=True)]
    width, height = decoded.original_size
    return ImageRecord(image_id, uri, width, height, decoded.sha256), records


def _prepare(item: CorpusItem, config: IndexConfig) -> _Prepared:
    """Worker: read + decode + resize to the embedding input (never raises)."""
    start = time.perf_counter()
    result = decode_file(item.uri, config.decode)
    resized = None
    if isinstance(result, DecodedImage):
        resized = resize_for_embedding(result.pixels, config.segmenter.embed_size)
    return _Prepared(item, result, resized, time.perf_counter() - start)


def _remove_stale_temp_files(out: Path) -> None:
    for name in (SKIPPED_FILE, SETTINGS_FILE):
        remove_stale_temp_files(out, name)
