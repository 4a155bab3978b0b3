"""The indexing job end to end (in process): real LMDB + FAISS, a tiny checkpoint, tiny photos.

Also home of the helpers the other indexer tests import (tiny checkpoint, photo corpus, bad
files), so that one pytest session trains the tiny checkpoint once.
"""
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segsearch.errors import IndexError_
from segsearch.indexer.corpus import read_corpus
from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.pipeline import SKIPPED_FILE, IndexConfig, index_corpus
from segsearch.indexer.segmenter import SegmenterConfig
from segsearch.spml.checkpoint import load_checkpoint, save_checkpoint

SEGMENTER = SegmenterConfig(embed_size=64, grid=(4, 4), iterations=5, min_area_fraction=0.01)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


# ---- helpers shared with test_segmenter.py and test_index_cli.py -------------------------

def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 5-second checkpoint (small backbone, 16-d), trained once per pytest session."""
    from segsearch.trainer.config import TrainConfig
    from segsearch.trainer.datasets import DataConfig
    from segsearch.trainer.train import train

    root = tmp_path_factory.getbasetemp() / "tiny_index_checkpoint"
    path = root / "checkpoint.pt"
    if not path.exists():
        torch.manual_seed(0)
        train(TrainConfig(out_dir=str(root), backbone="small", pretrained=False, edge_source="sobel",
                          steps=2, batch_size=4, data=DataConfig("mosaic", 32, 8, 2), embedding_dim=16,
                          hidden_dim=32, progress=False, device="cpu"))
    return path


def other_version_checkpoint(path: Path, out: Path) -> str:
    """Same architecture, one weight nudged: another model version. Returns that version."""
    checkpoint = load_checkpoint(path)
    name = sorted(checkpoint.state_dict)[0]
    checkpoint.state_dict[name] = checkpoint.state_dict[name] + 1e-3
    return save_checkpoint(checkpoint, out)


def photo(name: str, max_side: int = 80, flip: bool = False) -> np.ndarray:
    from skimage import data

    image = Image.fromarray(getattr(data, name)())
    image.thumbnail((max_side, max_side))
    array = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(array[:, ::-1]) if flip else array


def write_photos(folder: Path, flips: bool = False) -> list[str]:
    """The six photos (and their mirror images) as small JPEG/PNG files; returns the image ids."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for n, name in enumerate(PHOTOS):
        for flip in (False, True) if flips else (False,):
            file = f"{name}{'_flip' if flip else ''}.{'png' if n % 2 else 'jpg'}"
            Image.fromarray(photo(name, flip=flip)).save(folder / file)
            ids.append(file)
    return sorted(ids)


def png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files that must be skipped, with the reason expected in skipped.jsonl."""
    buffer = io.BytesIO()
    Image.fromarray(photo("coffee")).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    files = {
        "bad_empty.jpg": (b"", "empty_file"),
        "bad_text.png": (b"just some text, not a PNG\n", "not_an_image"),
        "bad_truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "bad_corrupt.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt"),
        "bad_bomb.png": (png_header_claiming(40_000, 40_000), "too_many_pixels"),
    }
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {name: reason for name, (_, reason) in files.items()}


def small_config(**overrides) -> IndexConfig:
    values = dict(batch_size=2, chunk_size=3, segmenter=SEGMENTER, progress=False, decode_workers=2, save_every=2)
    values.update(overrides)
    return IndexConfig(**values)


def all_prototypes(store: IndexStore):
    """(segment ids (N,), prototypes (N, D)) of every stored segment."""
    ids, protos = zip(*store._metadata.prototypes())
    return np.concatenate(ids), np.concatenate(protos)


def neighbours(store: IndexStore, queries: np.ndarray, k: int = 5):
    """Search results as comparable (image id, box, rounded score) lists (ids change on re-add)."""
    return [[(hit.segment.image_id, hit.segment.box, round(hit.score, 4)) for hit in hits]
            for hits in store.search(queries, k)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a shared 2-core machine OpenMP threads
    that wait for each other make small ops 10-50x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
            areas = [seg.area_fraction for seg in segments]
            assert abs(sum(areas) - 1.0) < 1e-6 and min(areas) > 0  # the masks partition the image
            assert all(seg.label and 0 < seg.label_score <= 1 for seg in segments)


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
    with pytest.raises(IndexError_) as info:
        index_corpus(corpus[0], tmp_path / "other.pt", built[0], small_config())
    assert other in str(info.value) and mine in str(info.value)


def test_other_segmentation_settings_are_refused(built, checkpoint, corpus):
    config = small_config(segmenter=SegmenterConfig(embed_size=96, grid=(4, 4), iterations=5,
                                                    min_area_fraction=0.01))
    with pytest.raises(IndexError_, match="segmenter.embed_size=96 \\(index: 64\\)"):
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
            with pytest.raises(IndexError_):
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
        assert store.stats()["faiss_index"].startswith("HNSW")
        assert store.verify() == []


def test_out_directory_that_is_not_an_index_is_refused(checkpoint, corpus, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(IndexError_, match="not a segsearch index"):
        index_corpus(corpus[0], checkpoint, tmp_path / "busy", small_config())
    with pytest.raises(IndexError_, match="no segsearch index"):
        index_corpus(corpus[0], checkpoint, tmp_path / "new", small_config(must_exist=True))
