"""One suite of reads against both implementations of `ReadableStore`, on the same records:
`IndexStore` holding every image, and `ShardedStore` over two shards holding half each.

Segment ids differ between the two (each shard allocates from its own range), so results are
compared by what a user sees: image, box, score.
"""
import json

import numpy as np
import pytest

from segsearch.errors import IndexStoreError
from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.sharded_store import ShardedStore
from segsearch.indexer.shards import ShardLayout, first_segment_id
from segsearch.indexer.store_api import ReadableStore, StoreStats
from indexer_helpers import DIM, MODEL, make_batch, make_image

NAMES = [f"img{i:03d}" for i in range(40)]
KINDS = ["single", "sharded"]


def _build(kind: str, root) -> ReadableStore:
    if kind == "single":
        with IndexStore.create(root, MODEL, DIM, "flat") as store:
            store.add_images(make_batch(NAMES))
        return IndexStore.open(root, MODEL, read_only=True)
    layout = ShardLayout.create(root, 2)
    for shard, shard_dir in enumerate(layout.shard_dirs):
        with IndexStore.create(shard_dir, MODEL, DIM, "flat", first_segment_id=first_segment_id(shard)) as store:
            store.add_images(make_batch(NAMES[shard::2]))
    return ShardedStore.open(root, MODEL)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    built = {kind: _build(kind, tmp_path_factory.mktemp(kind) / "index") for kind in KINDS}
    yield built
    for store in built.values():
        store.close()


@pytest.fixture(params=KINDS)
def store(request, stores) -> ReadableStore:
    return stores[request.param]


def _queries() -> np.ndarray:
    """Each image's segment 1 prototype, plus a random direction: `(Q, D)`."""
    protos = [make_image(name)[1][1].prototype for name in NAMES[::5]]
    rng = np.random.default_rng(0)
    extra = rng.standard_normal(DIM).astype(np.float32)
    return np.stack(protos + [extra / np.linalg.norm(extra)])


def _seen(hits) -> list:
    return [(hit.segment.image_id, hit.segment.box, round(hit.score, 5)) for hit in hits]


def test_both_satisfy_the_protocol(store):
    assert isinstance(store, ReadableStore) and store.read_only


def test_meta_and_stats_count_the_same_records(store):
    meta, stats = store.meta, store.stats()
    assert (meta.num_images, meta.num_segments, meta.model_version, meta.embedding_dim) == (40, 160, MODEL, DIM)
    assert isinstance(stats, StoreStats)
    assert (stats.num_images, stats.num_segments, stats.faiss_vectors) == (40, 160, 160)
    assert json.loads(json.dumps(stats.to_json()))["num_segments"] == 160


def test_a_segment_finds_itself_first(store):
    queries = _queries()
    for row, name in zip(store.search(queries[:-1], 3), NAMES[::5]):
        assert row[0].segment.image_id == name and row[0].score == pytest.approx(1.0, abs=1e-5)
        assert [hit.score for hit in row] == sorted((hit.score for hit in row), reverse=True)


def test_both_return_the_same_hits(stores):
    queries = _queries()
    single, sharded = (stores[kind].search(queries, 7) for kind in KINDS)
    assert [_seen(row) for row in single] == [_seen(row) for row in sharded]
    assert _seen(stores["single"].search(queries[0], 7)[0]) == _seen(single[0])  # one (D,) query


def test_records_by_id(store):
    hit = store.search(_queries()[:1], 1)[0][0]
    record = store.get_segment(hit.segment_id)
    assert record.image_id == hit.segment.image_id and record.box == hit.segment.box
    image = store.get_image(record.image_id)
    assert hit.segment_id in image.segment_ids
    assert store.has_image(record.image_id) and not store.has_image("nope")
    assert store.image_id_for_sha256(image.sha256) == record.image_id
    assert store.image_id_for_sha256("0" * 64) is None


def test_every_image_is_listed_once(store):
    assert sorted(image.image_id for image in store.iter_images()) == NAMES


def test_unknown_ids_raise_naming_the_id(store):
    with pytest.raises(IndexStoreError, match="segment id 987654 is not in"):
        store.get_segment(987654)
    with pytest.raises(IndexStoreError, match="'nope' is not in"):
        store.get_image("nope")


def test_consistent_and_nothing_to_refresh(store):
    assert store.verify() == []
    assert store.refresh() is False
