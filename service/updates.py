"""Live index updates (IndexImages, DeleteImages of images or single segments) through the indexer's code path.

An added image goes through the same steps as in `segsearch index`: `indexer.decode` (pixel
guard, EXIF, bounded size, the index's decode settings), the index's `Segmenter`, the
same records, and `IndexStore.add_images`: one LMDB transaction per chunk, then FAISS, so
the images are visible to the next search and a crash leaves both stores consistent.
Duplicates are skipped as the indexer skips them: an image id already indexed, or content
(sha256) already indexed under another id.

A response is sent only after `IndexStore.add_images` / `delete_images` returned, i.e. after
the LMDB commit, which is synced to disk: an acknowledged write survives a kill -9 or a power
loss. Storage faults reach the client as RESOURCE_EXHAUSTED (disk or LMDB map full, nothing
written) or FAILED_PRECONDITION (a failed sync: writes refused until restart).

Records are built by `pipeline.image_records`, the indexer's own function, from the bytes
received over gRPC (the server never reads a path sent by a client).
"""
from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from segsearch.errors import IndexStoreError, IndexFullError, StorageFailedError
from segsearch.indexer.decode import ImageSkipped, SkipReason
from segsearch.indexer.image_ids import MAX_IMAGE_ID_BYTES, image_id_problem
from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.pipeline import image_records
from segsearch.service.analysis import ImageAnalyzer
from segsearch.service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, echo
from segsearch.service.request_scope import stage

CHUNK_IMAGES = 16


@dataclass
class NewImage:
    data: bytes
    image_id: str = ""
    uri: str = ""


@dataclass
class IndexOutcome:
    indexed: list[tuple[str, list[int]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_segments(self) -> int:
        return sum(len(ids) for _, ids in self.indexed)


class FairLock:
    """A mutex granted in arrival order (a ticket lock): a writer that keeps coming back never
    starves one that waits. `threading.Lock` promises no order."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = self._serving = 0

    def __enter__(self) -> FairLock:
        with self._changed:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            self._changed.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()


class IndexUpdater:
    """Serialises the writes of one served index: commits and deletes take turns in arrival
    order (`FairLock`), while reading, decoding and segmenting a stream's images happens
    outside any lock, so a stalled or slow stream delays no other writer. (A duplicate that
    two streams add at once is caught by the store's own check inside its commit.)"""

    def __init__(self, store: IndexStore, analyzer: ImageAnalyzer, model_version: str, read_only: bool,
                 store_regions: bool = True):
        """`store_regions`: the index keeps region-level segments (its `SegmenterConfig.regions`);
        an index built with `--fine-only` gets fine segments only from live writes too."""
        self.store, self.analyzer = store, analyzer
        self.model_version, self.read_only = model_version, read_only
        self.store_regions = store_regions
        self._write_lock = FairLock()

    def _check_writable(self) -> None:
        if self.read_only:
            raise FailedPrecondition("this server serves its index read-only (--read-only); "
                                     "send updates to the writer, or run `segsearch index add`")

    def add(self, images: Iterable[NewImage]) -> IndexOutcome:
        """Decode, segment and store a stream of images, committing every CHUNK_IMAGES."""
        self._check_writable()
        outcome, pending = IndexOutcome(), []
        seen: dict[str, str] = {}
        for number, image in enumerate(images):  # the stream is read without holding the lock
            prepared = self._prepare(image, number, seen, outcome)
            if prepared is not None:
                pending.append(prepared)
            if len(pending) >= CHUNK_IMAGES:
                self._commit(pending, outcome)
                pending = []
        self._commit(pending, outcome)
        return outcome

    def _prepare(self, image: NewImage, number: int, seen: dict[str, str], outcome: IndexOutcome):
        problem = image.image_id and image_id_problem(image.image_id)
        if problem:  # before any work: a bad id is the caller's mistake, not a bad image
            raise InvalidArgument(f"image #{number}: image_id {echo(image.image_id)} cannot be used: {problem}")
        try:
            with stage("decode"):
                decoded = self.analyzer.decode_bounded(image.data)
        except ImageSkipped as skipped:
            outcome.skipped.append((image.image_id or f"#{number}", f"{skipped.skipped.reason.value}: "
                                    f"{skipped.skipped.detail}"))
            return None
        image_id = image.image_id or f"sha256:{decoded.sha256[:16]}"
        owner = seen.get(decoded.sha256) or self.store.image_id_for_sha256(decoded.sha256)
        if owner is not None or image_id in seen.values() or self.store.has_image(image_id):
            reason = (f"{SkipReason.DUPLICATE.value}: same content (sha256) as image {echo(owner)}" if owner
                      else f"{SkipReason.IMAGE_ID_TAKEN.value}: image id {echo(image_id)} is already indexed "
                           "with other content; send it under another image_id, or delete the old image first")
            outcome.skipped.append((image_id, reason))
            return None
        seen[decoded.sha256] = image_id
        segments = self.analyzer.segment(decoded)
        return image_records(image_id, image.uri, decoded, segments, self.model_version, self.store_regions)

    def _commit(self, pending: list, outcome: IndexOutcome) -> None:
        if not pending:
            return
        with self._write_lock, stage("store"), storage_errors():
            result = self.store.add_images(pending)  # returns after the durable LMDB commit
        added = set(result.image_ids)
        for image, records in pending:
            if image.image_id in added:
                stored = self.store.get_image(image.image_id)
                outcome.indexed.append((image.image_id, list(stored.segment_ids)))
        outcome.skipped.extend(result.skipped)

    def delete(self, image_ids: Sequence[str], segment_ids: Sequence[int] = ()) -> list[int]:
        """Remove images (with all their segments) and single segments from both stores;
        returns the removed segment ids. NOT_FOUND names unknown ids, and then nothing is
        deleted. Segments are deleted first, in their own commit, after checking that every
        image id exists; a segment of an image also named is simply deleted with it."""
        self._check_writable()
        if not image_ids and not segment_ids:
            raise InvalidArgument("image_ids and segment_ids are empty; name the images or segments to delete")
        for image_id in image_ids:  # a malformed id is the caller's mistake, not an unknown image
            if not 1 <= len(image_id.encode()) <= MAX_IMAGE_ID_BYTES:
                raise InvalidArgument(f"image id {image_id[:60]!r} has {len(image_id.encode())} bytes; "
                                      f"image ids are 1..{MAX_IMAGE_ID_BYTES} bytes of UTF-8")
        images = list(dict.fromkeys(image_ids))
        with self._write_lock, stage("store"), storage_errors():
            try:
                unknown = [i for i in images if not self.store.has_image(i)]
                if unknown:  # checked before any commit: all or nothing across the two commits
                    raise NotFound(f"unknown image id(s), nothing deleted: {', '.join(map(echo, unknown[:20]))}")
                segments = [s for s in dict.fromkeys(int(s) for s in segment_ids)
                            if not self._segment_of(s, images)]
                removed = self.store.delete_segments(segments) if segments else []
                return removed + (self.store.delete_images(images) if images else [])
            except (IndexFullError, StorageFailedError):
                raise
            except IndexStoreError as error:
                raise NotFound(f"{error}; segment ids come from search results") from None

    def _segment_of(self, segment_id: int, image_ids: list[str]) -> bool:
        """Whether `segment_id` belongs to one of `image_ids` (deleted with its image)."""
        if not image_ids:
            return False
        try:
            return self.store.get_segment(segment_id).image_id in image_ids
        except IndexStoreError:
            return False


@contextmanager
def storage_errors():
    """A full disk or LMDB map -> RESOURCE_EXHAUSTED (nothing written; free space and retry);
    a failed sync -> FAILED_PRECONDITION (writes refused until the server is restarted)."""
    try:
        yield
    except IndexFullError as error:
        raise ResourceExhausted(str(error)) from None
    except StorageFailedError as error:
        raise FailedPrecondition(str(error)) from None

