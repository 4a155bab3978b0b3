"""The indexing job end to end (in process): real LMDB + FAISS, a tiny checkpoint, tiny photos.
"""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from segsearch.errors import IndexStoreError
from segsearch.indexer.corpus import read_corpus
from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.records import LEVEL_FINE, LEVEL_REGION
from segsearch.indexer.rle import decode_mask
from segsearch.indexer.pipeline import SKIPPED_FILE, index_corpus
from segsearch.spml.segmenter import SegmenterConfig
from indexer_helpers import all_prototypes, small_config, write_bad_files, write_photos
from model_helpers import other_version_checkpoint, tiny_checkpoint

from segsearch.spml.checkpoint import load_checkpoint

def neighbours(store: IndexStore, queries: np.ndarray, k: int = 5):
    """Search results as comparable (image id, box, rounded score) lists (ids change on re-add)."""
    return [[(hit.segment.image_id, hit.segment.box, round(hit.score, 4)) for hit in hits]
            for hits in store.search(queries, k)]


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    good = write_photos(folder)
    bad = write_bad_files(folder)
    shutil.copy(folder / good[0], folder / "zz_copy_of_first.jpg")  # same bytes: a duplicate
    return folder, good, bad


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint, corpus):
    out = tmp_path_factory.mktemp("built") / "index"
    summary = index_corpus(corpus[0], checkpoint, out, small_config())
    return out, summary


# ---- tests ---------------------------------------------------------------------------------

def test_good_images_indexed_bad_ones_skipped_and_reported(built, corpus):
    out, summary = built
    _, good, bad = corpus
    assert summary.images_indexed == len(good) == summary.index_images
    assert summary.segments_indexed == summary.index_segments > len(good)
    assert summary.skipped == len(bad) + 1
    report = [json.loads(line) for line in (out / SKIPPED_FILE).read_text().splitlines()]
    reasons = {entry["image_id"]: entry["reason"] for entry in report}
    assert reasons == {**bad, "zz_copy_of_first.jpg": "duplicate"}
    assert all(entry["detail"] and Path(entry["uri"]).name == entry["image_id"] for entry in report)
    assert set(summary.stage_seconds) >= {"decode", "embed", "segment", "label", "store"}
    assert summary.stage_seconds["embed"] > 0 and summary.stage_seconds["decode"] > 0
    with IndexStore.open(out, read_only=True) as store:
        assert store.verify() == []
        for image_id in good:
            image = store.get_image(image_id)
            assert image.segment_ids and image.uri == str(corpus[0] / image_id)
            segments = [store.get_segment(sid) for sid in image.segment_ids]
            for level in (LEVEL_FINE, LEVEL_REGION):  # each level's masks partition the image
                areas = [seg.area_fraction for seg in segments if seg.level == level]
                assert abs(sum(areas) - 1.0) < 1e-6 and min(areas) > 0
            assert all(seg.label and 0 < seg.label_score <= 1 for seg in segments)
            assert_fine_segments_lie_in_their_regions(store, segments)


def assert_fine_segments_lie_in_their_regions(store, segments) -> None:
    """Every fine segment names a region of its own image as parent, and lies inside it."""
    regions = {seg.segment_id: seg for seg in segments if seg.level == LEVEL_REGION}
    assert regions
    covered = {region_id: 0.0 for region_id in regions}
    for seg in segments:
        if seg.level == LEVEL_REGION:
            assert seg.parent_id == 0 and seg.parent_index == -1
            continue
        parent = regions[seg.parent_id]
        assert store.get_segment(seg.parent_id).image_id == seg.image_id
        inside = decode_mask(seg.mask_rle, seg.mask_shape) & ~decode_mask(parent.mask_rle, parent.mask_shape)
        assert not inside.any()
        covered[seg.parent_id] += seg.area_fraction
    for region_id, area in covered.items():  # a region is exactly the union of its fine segments
        assert abs(area - regions[region_id].area_fraction) < 1e-6


def test_each_segment_finds_itself_as_nearest_neighbour(built):
    with IndexStore.open(built[0], read_only=True) as store:
        ids, protos = all_prototypes(store)
        hits = store.search(protos, 5)
    for segment_id, row in zip(ids, hits):
        best = row[0].score
        assert best == pytest.approx(1.0, abs=1e-4)
        tied_best = {hit.segment_id for hit in row if hit.score >= best - 1e-6}
        assert segment_id in tied_best


def test_rerun_adds_nothing_and_keeps_one_report_line_per_skip(built, checkpoint, corpus, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    again = index_corpus(corpus[0], checkpoint, out, small_config())
    assert again.images_indexed == 0 and again.segments_indexed == 0
    assert again.already_indexed == len(corpus[1])
    assert (again.index_images, again.index_segments) == (built[1].index_images, built[1].index_segments)
    lines = (out / SKIPPED_FILE).read_text().splitlines()
    assert len(lines) == len({json.loads(line)["image_id"] for line in lines}) == built[1].skipped


def test_checkpoint_of_another_model_version_is_refused(built, checkpoint, corpus, tmp_path):
    other = other_version_checkpoint(checkpoint, tmp_path / "other.pt")
    mine = load_checkpoint(checkpoint).model_version
    with pytest.raises(IndexStoreError) as info:
        index_corpus(corpus[0], tmp_path / "other.pt", built[0], small_config())
    assert other in str(info.value) and mine in str(info.value)


def test_other_segmentation_settings_are_refused(built, checkpoint, corpus):
    config = small_config(segmenter=SegmenterConfig(embed_size=96, grid=(4, 4), iterations=5,
                                                    min_area_fraction=0.01))
    with pytest.raises(IndexStoreError, match="segmenter.embed_size=96 \\(index: 64\\)"):
        index_corpus(corpus[0], checkpoint, built[0], config)


def test_delete_removes_segments_from_search_and_lmdb(built, corpus, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    victim = corpus[1][1]
    with IndexStore.open(out) as store:
        doomed = store.get_image(victim).segment_ids
        doomed_protos = np.stack([store.get_segment(sid).prototype for sid in doomed])
        removed = store.delete_images([victim])
        assert sorted(removed) == sorted(doomed)
        assert store.verify() == []
        lmdb_ids, faiss_ids = store.segment_ids()
        assert not set(doomed) & set(lmdb_ids.tolist()) and not set(doomed) & set(faiss_ids.tolist())
        for sid in doomed:
            with pytest.raises(IndexStoreError):
                store.get_segment(sid)
        found = {hit.segment.image_id for hits in store.search(doomed_protos, 10) for hit in hits}
        assert victim not in found
        assert store.meta.num_images == built[1].index_images - 1


def test_delete_then_readd_gives_the_same_search_results(built, checkpoint, corpus, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    with IndexStore.open(out, read_only=True) as store:
        _, queries = all_prototypes(store)
        before = neighbours(store, queries)
    with IndexStore.open(out) as store:
        store.delete_images(corpus[1][:2])
    summary = index_corpus(corpus[0], checkpoint, out, small_config())
    assert summary.images_indexed == 2
    with IndexStore.open(out, read_only=True) as store:
        assert store.verify() == []
        assert neighbours(store, queries) == before


def test_manifest_corpus_and_index_type_are_used(checkpoint, corpus, tmp_path):
    folder, good, _ = corpus
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"uri": str(folder / name), "image_id": f"img-{n}"}) + "\n"
                                for n, name in enumerate(good[:2])))
    out = tmp_path / "index"
    summary = index_corpus(read_corpus(manifest), checkpoint, out, small_config(index_type="hnsw"))
    assert summary.images_indexed == 2
    with IndexStore.open(out, read_only=True) as store:
        assert store.get_image("img-1").uri == str(folder / good[1])
        assert store.stats().faiss_index.startswith("HNSW")
        assert store.verify() == []


def test_out_directory_that_is_not_an_index_is_refused(checkpoint, corpus, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(IndexStoreError, match="not a segsearch index"):
        index_corpus(corpus[0], checkpoint, tmp_path / "busy", small_config())
    with pytest.raises(IndexStoreError, match="no segsearch index"):
        index_corpus(corpus[0], checkpoint, tmp_path / "new", small_config(must_exist=True))


def test_chunk_size_is_honoured_even_below_the_batch_size(checkpoint, tmp_path, caplog):
    """`--chunk-size 2` with batches of 8 used to commit whole batches."""
    folder = tmp_path / "photos"
    write_photos(folder)  # six images
    with caplog.at_level(logging.INFO, logger="segsearch.indexer.pipeline"):
        summary = index_corpus(folder, checkpoint, tmp_path / "index", small_config(batch_size=8, chunk_size=2))
    commits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("committed chunk")]
    assert summary.images_indexed == 6 and len(commits) == 3
    assert all(": 2 images," in message for message in commits)
