"""Distributed indexing on a real Dask LocalCluster (loopback, 2 worker processes).

The reference is `index_corpus` over the same corpus in this process; the distributed run
must give the same images and segments (records compared by image id and segment order,
prototypes within float tolerance) and the same nearest neighbours on an exact index, with
`segsearch index verify` clean, also when a worker is SIGKILLed in the middle of its shard.

batch_size is 1 in every run so that each image goes through the network alone in both the
reference and the shards (batch composition differs between them otherwise, and the CPU
kernels may round differently for another batch shape).
"""
import dataclasses
import ipaddress
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsearch.cli import main as segsearch_main
from segsearch.indexer.dask_runner import DaskConfig, index_distributed, split
from segsearch.indexer.index_store import LMDB_DIR, IndexStore
from segsearch.indexer.merge import merge_record, merge_shards
from segsearch.indexer.metadata_store import MetadataStore
from segsearch.indexer.pipeline import SKIPPED_FILE, SkipReport, index_corpus
from segsearch.indexer.sharded_store import ShardedStore
from segsearch.indexer.shards import ID_STRIDE, SHARDS_DIR, ShardLayout

from indexer_helpers import all_prototypes, small_config, write_photos
from model_helpers import photo, tiny_checkpoint


distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


CONFIG = small_config(batch_size=1, chunk_size=1, save_every=1, decode_workers=1, index_type="flat")
FIFO_IMAGE = "rocket_flip.png"  # 7th of 8 items: the 3rd of shard 1's four


def write_corpus(folder: Path) -> list[str]:
    """8 images: six photos, a mirrored one, and a copy of the first (a duplicate that lands
    in the other shard than its original). Sorted ids; shard 0 gets the first four."""
    write_photos(folder)
    Image.fromarray(photo("rocket", flip=True)).save(folder / FIFO_IMAGE)
    shutil.copy(folder / "astronaut.jpg", folder / "zz_copy_of_astronaut.jpg")
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    names = write_corpus(folder)
    assert len(names) == 8 and names[6] == FIFO_IMAGE
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint, corpus):
    out = tmp_path_factory.mktemp("reference") / "index"
    summary = index_corpus(corpus, checkpoint, out, CONFIG)
    assert summary.images_indexed == 7 and summary.skipped == 1  # the copy is a duplicate
    return out


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as cluster, distributed.Client(cluster) as client:
        yield client


# ---- comparison helpers --------------------------------------------------------------------

def contents(index_dir: Path, with_uri: bool = True) -> dict:
    """image id -> (image fields, [segment fields in id order]); prototypes apart."""
    metadata = MetadataStore.open(index_dir / LMDB_DIR, read_only=True)
    try:
        segments = {seg.segment_id: seg for seg in metadata.iter_segments()}
        found = {}
        for image in metadata.iter_images():
            segs = [segments[sid] for sid in image.segment_ids]
            fields = [(s.box, round(s.area_fraction, 6), s.mask_rle, s.mask_shape, s.label,
                       round(s.label_score, 4), s.model_version) for s in segs]
            uri = image.uri if with_uri else Path(image.uri).name
            found[image.image_id] = ((uri, image.width, image.height, image.sha256), fields,
                                     np.stack([s.prototype for s in segs]))
        return found
    finally:
        metadata.close()


def assert_same_segments(got_dir: Path, want_dir: Path, with_uri: bool = True) -> None:
    got, want = contents(got_dir, with_uri), contents(want_dir, with_uri)
    assert sorted(got) == sorted(want)
    for image_id, (image, fields, protos) in want.items():
        assert got[image_id][0] == image, image_id
        assert got[image_id][1] == fields, image_id
        np.testing.assert_allclose(got[image_id][2], protos, atol=1e-5, err_msg=image_id)


def neighbours(store, queries: np.ndarray, k: int = 6) -> list:
    return [[(hit.segment.image_id, hit.segment.box, round(hit.score, 4)) for hit in hits]
            for hits in store.search(queries, k)]


def assert_same_neighbours(got_dir: Path, want_dir: Path) -> None:
    with IndexStore.open(want_dir, read_only=True) as want:
        _, queries = all_prototypes(want)
        expected = neighbours(want, queries)
    with IndexStore.open(got_dir, read_only=True) as got:
        assert neighbours(got, queries) == expected


def skipped(index_dir: Path) -> set:
    return {(e["image_id"], e["reason"]) for e in SkipReport(index_dir / SKIPPED_FILE).entries()}


def verify_cli(path: Path) -> int:
    return segsearch_main(["index", "verify", str(path)])


# ---- tests ---------------------------------------------------------------------------------

def test_split_keeps_corpus_order_in_contiguous_runs():
    assert split(list(range(7)), 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert split([1], 3) == [[], [], [1]]


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint, corpus, client):
    out = tmp_path_factory.mktemp("dist") / "index"
    return out, index_distributed(corpus, checkpoint, out, CONFIG, DaskConfig(), client=client)


def test_two_workers_give_the_single_process_index(built, checkpoint, corpus, reference, client, capsys):
    out, summary = built
    assert summary.num_shards == 2 and len({run.worker for run in summary.shards}) >= 1
    assert summary.cross_shard_duplicates == 1 and summary.images_indexed == 7 and summary.skipped == 1
    assert_same_segments(out, reference)
    assert_same_neighbours(out, reference)
    assert skipped(out) == skipped(reference) == {("zz_copy_of_astronaut.jpg", "duplicate")}
    assert verify_cli(out) == 0 and verify_cli(out / SHARDS_DIR) == 0
    assert "OK" in capsys.readouterr().out

    # ids: each shard numbers from its own range, and the merged index keeps them
    layout = ShardLayout.load(out / SHARDS_DIR)
    with ShardedStore.open(layout.root) as sharded:
        shard_ids = [store.segment_ids()[0] for store in sharded.shards]
    assert shard_ids[0].min() == 1 and shard_ids[1].min() == ID_STRIDE + 1
    with IndexStore.open(out, read_only=True) as merged:
        assert np.array_equal(merged.segment_ids()[0], np.concatenate(shard_ids))

    # a re-run (through the scheduler's address, as `--dask tcp://HOST:PORT` does) has nothing to do
    address = client.scheduler_info()["address"]
    assert address.startswith("tcp://127.0.0.1:")
    again = index_distributed(corpus, checkpoint, out, CONFIG, DaskConfig(cluster=address))
    assert again.images_indexed == 0 and again.merge.up_to_date and again.num_workers == 2


def test_killed_worker_shard_is_retried_and_resumed(tmp_path, checkpoint, reference, client):
    """Shard 1's third image is a FIFO: the worker's decoder blocks on it after the shard
    committed two images. The test SIGKILLs that worker, puts the real image in place, and
    Dask reruns the shard, which resumes (two images already there)."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    real_image = (corpus / FIFO_IMAGE).read_bytes()
    (corpus / FIFO_IMAGE).unlink()
    os.mkfifo(corpus / FIFO_IMAGE)
    out = tmp_path / "dist"
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=_run_catching(corpus, checkpoint, out, client)))
    job.start()
    try:
        pid = _worker_blocked_in_shard_1(client, out / SHARDS_DIR / "shard-0001", expect_images=2)
        (corpus / FIFO_IMAGE).unlink()
        (corpus / FIFO_IMAGE).write_bytes(real_image)  # what the retry will read
        os.kill(pid, signal.SIGKILL)
    finally:
        job.join(timeout=240)
    assert not job.is_alive(), "the distributed job did not finish after the worker was killed"
    summary = result["summary"]
    assert not isinstance(summary, BaseException), summary
    shard_1 = summary.shards[1].summary
    assert shard_1.already_indexed == 2 and shard_1.images_indexed == 2  # resumed, not redone
    assert summary.images_indexed + 2 == 7
    assert_same_segments(out, reference, with_uri=False)
    assert_same_neighbours(out, reference)
    assert verify_cli(out) == 0 and verify_cli(out / SHARDS_DIR) == 0


def _run_catching(corpus, checkpoint, out, client):
    try:
        return index_distributed(corpus, checkpoint, out, CONFIG, DaskConfig(retries=1), client=client)
    except BaseException as exc:  # noqa: BLE001 - reported by the test thread
        return exc


def _worker_blocked_in_shard_1(client, shard_dir: Path, expect_images: int, timeout: float = 120.0) -> int:
    """The pid of the worker running shard 1, once the shard committed `expect_images`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (shard_dir / LMDB_DIR / "data.mdb").exists():
            metadata = MetadataStore.open(shard_dir / LMDB_DIR, read_only=True)
            count = metadata.meta().num_images
            metadata.close()
            assert count <= expect_images, "the shard went past the FIFO"
            if count == expect_images:
                for address, keys in client.processing().items():
                    if any("segsearch-shard-0001" in str(key) for key in keys):
                        return int(client.run(os.getpid, workers=[address])[address])
        time.sleep(0.1)
    raise AssertionError(f"shard 1 did not reach {expect_images} images within {timeout} s")


def test_existing_single_process_index_is_refused(tmp_path, checkpoint, corpus, reference, client):
    from segsearch.errors import IndexStoreError

    with pytest.raises(IndexStoreError, match="built by one process"):
        index_distributed(corpus, checkpoint, reference, CONFIG, DaskConfig(), client=client)
    config = dataclasses.replace(CONFIG, must_exist=True)
    with pytest.raises(IndexStoreError, match="no sharded index"):
        index_distributed(corpus, checkpoint, tmp_path / "new", config, DaskConfig(), client=client)


def test_merge_interrupted_before_its_commit_point_is_redone(built, tmp_path, monkeypatch):
    """A crash between moving the FAISS file in and moving the LMDB in (the commit point)
    leaves no merged index (merge.json gone); the next merge rebuilds it from the shards."""
    out = tmp_path / "index"
    shutil.copytree(built[0], out, ignore=shutil.ignore_patterns("writer.lock"))
    with IndexStore.open(out / SHARDS_DIR / "shard-0001") as shard:
        shard.delete_images(["rocket.png"])  # the shards changed: the merge must be redone
    real_rename = os.rename

    def crash_at_lmdb(src, dst):
        if Path(dst) == out / LMDB_DIR:
            raise OSError("simulated crash before the LMDB rename")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_at_lmdb)
    with pytest.raises(OSError, match="simulated crash"):
        merge_shards(out / SHARDS_DIR, out)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (out / LMDB_DIR).exists() and merge_record(out) is None
    assert merge_shards(out / SHARDS_DIR, out).images == 6
    assert verify_cli(out) == 0
    with IndexStore.open(out, read_only=True) as merged:
        assert not merged.has_image("rocket.png") and merged.meta.num_images == 6
    assert merge_shards(out / SHARDS_DIR, out).up_to_date


def test_merged_index_changed_after_its_merge_is_not_replaced_silently(built, tmp_path):
    from segsearch.errors import IndexStoreError

    out = tmp_path / "index"
    shutil.copytree(built[0], out, ignore=shutil.ignore_patterns("writer.lock"))
    with IndexStore.open(out) as merged:
        merged.delete_images(["coins.png"])
    with pytest.raises(IndexStoreError, match="changed after it was merged"):
        merge_shards(out / SHARDS_DIR, out)
    assert merge_shards(out / SHARDS_DIR, out, force=True).images == 7
    with IndexStore.open(out, read_only=True) as merged:
        assert merged.has_image("coins.png") and merged.verify() == []


@pytest.mark.slow
def test_cli_with_its_own_local_cluster(tmp_path, checkpoint, corpus, reference, capsys):
    """`segsearch index ... --dask local:2 --no-merge`, then `index merge`, `stats`, `verify`."""
    import json

    out = tmp_path / "cli"
    flags = ["--batch-size", "1", "--chunk-size", "1", "--save-every", "1", "--workers", "1",
             "--index-type", "flat", "--embed-size", "64", "--grid", "4x4", "--kmeans-iterations", "5",
             "--min-area", "0.01", "--no-progress"]
    assert segsearch_main(["index", str(corpus), "--model", str(checkpoint), "--out", str(out),
                           "--dask", "local:2", "--no-merge", *flags]) == 0
    assert "2 shard(s)" in capsys.readouterr().out and not (out / LMDB_DIR).exists()
    assert segsearch_main(["index", "stats", str(out), "--json"]) == 0  # OUT without a merge: its shards
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_shards"] == 2 and stats["num_images"] == 7 and stats["skipped_images"] == 1
    assert segsearch_main(["index", "merge", str(out)]) == 0
    assert "merged 2 shards" in capsys.readouterr().out
    assert_same_segments(out, reference)
    assert verify_cli(out) == 0


def test_local_cluster_listens_on_loopback_only():
    """`--dask local:N`: scheduler, nannies, workers and their HTTP endpoints on 127.0.0.1."""
    psutil = pytest.importorskip("psutil")
    from segsearch.indexer.dask_runner import connect

    with connect("local:1") as client:
        assert len(client.nthreads()) == 1 and set(client.nthreads().values()) == {1}
        me = psutil.Process()
        listening = [conn.laddr for process in [me, *me.children(recursive=True)]
                     for conn in process.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]
    assert len(listening) >= 4  # scheduler + its HTTP server, nanny, worker
    # other tests' gRPC servers may still listen in this process, as IPv4-mapped 127.0.0.1
    assert all(_is_loopback(address.ip) for address in listening), listening


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_the_progress_bar_counts_what_the_shards_commit(tmp_path):
    """The parent reads each shard's LMDB while a writer in another process commits."""
    import subprocess
    import sys
    import textwrap
    import time

    from segsearch.indexer.dask_runner import ShardProgress
    from segsearch.indexer.shards import ShardLayout, first_segment_id
    from indexer_helpers import DIM, MODEL

    layout = ShardLayout.create(tmp_path / "shards", 2)
    for shard, shard_dir in enumerate(layout.shard_dirs):
        IndexStore.create(shard_dir, MODEL, DIM, "flat", first_segment_id=first_segment_id(shard)).close()
    writer = textwrap.dedent(f"""
        import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from indexer_helpers import IndexStore, make_batch
        for number, shard_dir in enumerate({[str(d) for d in layout.shard_dirs]!r}):
            with IndexStore.open(shard_dir) as store:
                store.add_images(make_batch([f"s{{number}}-{{i}}" for i in range(3 + number)]))
    """)
    with ShardProgress(layout, total=7, every=0.05) as progress:
        subprocess.run([sys.executable, "-c", writer], check=True, timeout=120)
        deadline = time.monotonic() + 10
        while progress.done < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert progress.done == 7
