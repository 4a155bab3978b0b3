"""Storage faults under the IndexStore: what vector-database users have lost data to, each tested.

- an acknowledged write not durable: LMDB's commit must sync (its environment flags);
- a rename not followed by an fsync of its directory: the atomic FAISS save is traced;
- a log that goes on after a failed fsync: EIO from fsync (Python's, and LMDB's own through an
  LD_PRELOAD shim of libc) must fail the write and stop all later writes;
- a deleted vector that reappears: an older FAISS file comes back after a delete;
- a write-ahead log truncated or damaged: a cut or garbled LMDB data file is refused by name;
- a full disk: a clear IndexFullError naming the filesystem, nothing half-written, and writes
  work again once space is freed (a real size-limited tmpfs).

Only stdlib calls (os.fsync, os.replace, os.rename, os.statvfs) are wrapped, never our own code.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from segsearch.errors import IndexStoreError, IndexFullError, StorageFailedError
from segsearch.indexer.index_store import VECTORS_FILE, IndexStore
from segsearch.indexer.vector_index import VectorIndex

from indexer_helpers import DIM, MODEL, fill, make_batch, make_image


def _consistent(store: IndexStore) -> bool:
    lmdb_ids, faiss_ids = store.segment_ids()
    return store.verify() == [] and np.array_equal(lmdb_ids, faiss_ids)


def test_lmdb_commits_are_synced_before_a_write_returns(tmp_path):
    """A write is acknowledged when `add_images` returns, right after the LMDB commit: that
    commit must reach the disk (no MDB_NOSYNC / MDB_MAPASYNC / MDB_NOMETASYNC)."""
    with IndexStore.create(tmp_path / "index", MODEL, DIM) as store:
        flags = store._metadata._env.flags()
    assert flags["sync"] and flags["metasync"] and not flags["map_async"] and not flags["writemap"]


class _Trace:
    """os.fsync / os.replace / os.rename, recorded and then done for real."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            info = os.fstat(fd)
            self.events.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
            return real_fsync(fd)

        def replace(src, dst):
            self.events.append(("replace", Path(src).name, Path(dst)))
            return real_replace(src, dst)

        def rename(src, dst):
            self.events.append(("rename", Path(src).name, Path(dst)))
            return real_rename(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)


def test_atomic_saves_fsync_the_file_then_rename_then_fsync_the_directory(tmp_path, monkeypatch):
    root = tmp_path / "index"
    trace = _Trace(monkeypatch)
    store = IndexStore.create(root, MODEL, DIM)
    renamed = [n for n, e in enumerate(trace.events) if e[0] == "rename" and e[2] == root]
    assert len(renamed) == 1  # the staging directory becomes the index...
    assert ("fsync", "dir", tmp_path.stat().st_ino) in trace.events[renamed[0] + 1:]  # ...durably
    trace.events.clear()
    store.add_images(make_batch(["a", "b"]))  # save_every=1: one FAISS save
    store.close()
    assert [e[0] for e in trace.events] == ["fsync", "replace", "fsync"]
    (_, kind, file_inode), (_, tmp_name, target), (_, dir_kind, dir_inode) = trace.events
    assert kind == "file" and tmp_name.startswith(f".{VECTORS_FILE}.tmp-") and target == root / VECTORS_FILE
    assert file_inode == (root / VECTORS_FILE).stat().st_ino  # the file synced is the file renamed
    assert dir_kind == "dir" and dir_inode == root.stat().st_ino  # and then its directory


@pytest.mark.parametrize("failing", ["file", "dir"])
def test_failed_fsync_of_the_faiss_save_stops_writes_and_loses_nothing(tmp_path, monkeypatch, failing):
    root = tmp_path / "index"
    store = IndexStore.create(root, MODEL, DIM, save_every=1)  # the commit below saves FAISS
    fill(store, 20, 10)
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) == (failing == "dir"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageFailedError, match=r"fsync of .* failed \(Input/output error\)"):
        store.add_images(make_batch(["late"]))  # committed in LMDB, then the save's fsync failed
    monkeypatch.setattr(os, "fsync", real_fsync)  # a retry might "succeed" over lost pages: no retry
    for write in (lambda: store.add_images(make_batch(["later"])), lambda: store.delete_images(["img0001"]),
                  store.flush):
        with pytest.raises(StorageFailedError, match="refuses writes since a storage failure.*reopen"):
            write()
    assert store.search(make_image("late")[1][0].prototype, 1)[0][0].segment.image_id == "late"  # reads go on
    store.close()  # writes nothing more, raises nothing
    assert not list(root.glob(f".{VECTORS_FILE}.tmp-*"))
    with IndexStore.open(root, MODEL) as reopened:
        assert _consistent(reopened)
        assert reopened.has_image("late") and not reopened.has_image("later") and reopened.has_image("img0001")
        assert reopened.search(make_image("late")[1][2].prototype, 1)[0][0].segment.image_id == "late"


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
/* fsync and fdatasync fail with EIO while the file named by $FAIL_FSYNC_FLAG exists. */
static int failing(void) {
    const char *flag = getenv("FAIL_FSYNC_FLAG");
    return flag && access(flag, F_OK) == 0;
}
#define WRAP(name) int name(int fd) { \
    static int (*real)(int); \
    if (failing()) { errno = EIO; return -1; } \
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, #name); \
    return real(fd); }
WRAP(fsync)
WRAP(fdatasync)
"""

LMDB_EIO_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[3], str(Path(sys.argv[3]).parent)]  # the helpers
    from indexer_helpers import DIM, MODEL, IndexStore, make_batch
    root, flag = Path(sys.argv[1]), Path(sys.argv[2])
    seen = {}
    store = IndexStore.create(root, MODEL, DIM)
    store.add_images(make_batch(["before"]))
    flag.touch()  # from here LMDB's fdatasync of its commit fails
    for name in ("during", "after"):
        try:
            store.add_images(make_batch([name]))
            seen[name] = "ok"
        except Exception as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"
        flag.unlink(missing_ok=True)
    store.close()
    print(json.dumps(seen))
""")


def test_failed_lmdb_fsync_fails_the_write_and_stops_writes(tmp_path):
    """LMDB syncs in C (fdatasync): a libc shim makes it fail with EIO for real."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fsync-failing LD_PRELOAD shim")
    (tmp_path / "shim.c").write_text(SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"), str(tmp_path / "shim.c"), "-ldl"],
                   check=True)
    root, flag = tmp_path / "index", tmp_path / "flag"
    env = {**os.environ, "LD_PRELOAD": str(tmp_path / "shim.so"), "FAIL_FSYNC_FLAG": str(flag)}
    child = subprocess.run([sys.executable, "-c", LMDB_EIO_CHILD, str(root), str(flag), str(Path(__file__).parent)],
                           env=env, capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen["during"].startswith("StorageFailedError: writing the metadata store")
    assert "Input/output error" in seen["during"] and str(root / "metadata.lmdb") in seen["during"]
    assert seen["after"].startswith("StorageFailedError") and "refuses writes" in seen["after"]
    with IndexStore.open(root, MODEL) as store:
        assert _consistent(store)
        assert store.has_image("before") and not store.has_image("during") and not store.has_image("after")


@pytest.mark.parametrize("spec", ["flat", "hnsw"])
def test_deleted_vectors_do_not_come_back_with_an_older_faiss_file(tmp_path, spec):
    root = tmp_path / "index"
    with IndexStore.create(root, MODEL, DIM, spec) as store:
        fill(store, 40, 20)
    old = (root / VECTORS_FILE).read_bytes()
    gone = [f"img{i:04d}" for i in (3, 17, 31)]
    queries = np.stack([make_image(name)[1][1].prototype for name in gone])
    with IndexStore.open(root, MODEL) as store:
        removed = store.delete_images(gone)
    (root / VECTORS_FILE).write_bytes(old)  # a lost save, or a FAISS backup restored
    assert set(removed) <= set(VectorIndex.load(root / VECTORS_FILE).ids().tolist())
    for _ in range(2):  # the repairing open, then another restart
        with IndexStore.open(root, MODEL) as store:
            assert _consistent(store)
            assert not set(removed) & set(store.segment_ids()[1].tolist())  # out of FAISS, not just hidden
            assert not {h.segment.image_id for row in store.search(queries, 10) for h in row} & set(gone)
        assert not set(removed) & set(VectorIndex.load(root / VECTORS_FILE).ids().tolist())


# ---- a damaged LMDB data file ------------------------------------------------------------------

# In a child: reading a page past the end of a mapped file is SIGBUS, which would take pytest down.
OPEN_CHILD = textwrap.dedent("""
    import json, sys
    from segsearch.indexer.index_store import IndexStore
    from segsearch.errors import IndexStoreError
    results = {}
    for read_only in (False, True):
        try:
            IndexStore.open(sys.argv[1], read_only=read_only).close()
            results[str(read_only)] = "opened"
        except IndexStoreError as exc:
            results[str(read_only)] = str(exc)
    print(json.dumps(results))
""")


def _damage(data: Path, how: str) -> None:
    raw = data.read_bytes()
    damaged = {"empty": b"", "one_page": raw[:4096], "meta_only": raw[:8192], "half": raw[: len(raw) // 2],
               "last_page_cut": raw[:-4096], "meta_garbage": b"\x5a" * 8192 + raw[8192:]}[how]
    data.write_bytes(damaged)


@pytest.fixture(scope="module")
def filled_index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("filled") / "index"
    with IndexStore.create(root, MODEL, DIM) as store:
        fill(store, 200, 50)
        store.delete_images(["img0007"])
    return root


@pytest.mark.parametrize("how", ["empty", "one_page", "meta_only", "half", "last_page_cut", "meta_garbage"])
def test_a_truncated_or_garbled_lmdb_file_is_refused_by_name(filled_index, tmp_path, how):
    root = tmp_path / "index"
    shutil.copytree(filled_index, root)
    data = root / "metadata.lmdb" / "data.mdb"
    _damage(data, how)
    damaged = data.read_bytes()
    child = subprocess.run([sys.executable, "-c", OPEN_CHILD, str(root)], capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0, f"the open crashed (status {child.returncode}): {child.stderr[-2000:]}"
    for message in json.loads(child.stdout.strip().splitlines()[-1]).values():
        assert message != "opened"
        if how == "meta_garbage":
            assert str(data.parent) in message and "MDB_INVALID" in message
        else:
            assert f"the metadata store file {data} is truncated" in message and "backup" in message
    assert data.read_bytes() == damaged  # not re-initialised as an empty store


def test_lmdb_counts_that_disagree_with_the_meta_record_are_refused(tmp_path):
    """Damage LMDB cannot see (it has no checksums) but that the open's cheap check can."""
    import lmdb

    root = tmp_path / "index"
    with IndexStore.create(root, MODEL, DIM) as store:
        fill(store, 20, 10)
    env = lmdb.open(str(root / "metadata.lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        segments = env.open_db(b"segments", txn=txn, create=False)
        key = next(iter(txn.cursor(db=segments).iternext(values=False)))
        txn.delete(key, db=segments)  # a segment record lost behind the meta record's back
    env.close()
    with pytest.raises(IndexStoreError, match=r"data\.mdb is damaged: entry counts"):
        IndexStore.open(root, MODEL)


# ---- a full disk (a real, size-limited tmpfs) -------------------------------------------------------

def _fill_disk_until_full(store: IndexStore, mount: Path) -> tuple[list[str], list[str], IndexFullError]:
    added = []
    for chunk in range(400):
        names = [f"c{chunk:03d}-{j}" for j in range(20)]
        try:
            added += store.add_images(make_batch(names)).image_ids
        except IndexFullError as error:
            return added, names, error
    raise AssertionError(f"{mount} never filled")


@pytest.mark.parametrize("precheck,save_every", [(True, 1), (False, 1), (False, 1000)])
def test_a_full_disk_is_a_clear_error_and_writes_resume_after_freeing_space(small_disk, monkeypatch, precheck,
                                                                            save_every):
    """With the free-space check the write is refused before LMDB commits. Without it (statvfs
    reporting no sizes, as some filesystems do) ENOSPC is met for real: by the FAISS save after
    the LMDB commit (save_every=1), or by LMDB itself (save_every=1000: no FAISS saves)."""
    root = small_disk / "index"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 << 20))
    if not precheck:
        real = os.statvfs
        monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((0,) * 10) if Path(path) == root
                            else real(path))
    store = IndexStore.create(root, MODEL, DIM, save_every=save_every)
    added, refused, error = _fill_disk_until_full(store, small_disk)
    assert f"no space left on the filesystem mounted at {small_disk}" in str(error)
    assert added
    committed = [name for name in refused if store.has_image(name)]
    if precheck:
        assert not committed and ("nothing was written" in str(error) or "nothing from this batch" in str(error))
    elif save_every == 1:
        assert committed == refused and "This write itself IS committed" in str(error)
    else:
        assert not committed and "metadata store" in str(error) and "nothing from this batch" in str(error)
    query = make_image(added[0])[1][0].prototype
    assert store.search(query, 1)[0][0].segment.image_id == added[0]  # readable
    filler.unlink()
    store.add_images(make_batch(["after-free"]))  # also saves what the failed save left unsaved
    assert _consistent(store)
    store.close()
    monkeypatch.undo()
    with IndexStore.open(root, MODEL, read_only=True, repair=False) as reopened:
        assert _consistent(reopened)
        assert all(reopened.has_image(name) for name in added + ["after-free"])
        assert all(len(reopened.get_image(name).segment_ids) == 4 for name in committed)  # all or nothing
