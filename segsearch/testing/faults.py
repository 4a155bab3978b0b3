"""Reliability: `kill -9` of a live `segsearch serve` during concurrent updates loses nothing.

One run is a series of rounds on ONE index. In each round a real `segsearch serve` child
process (127.0.0.1, port 0, no metrics) receives, from this process:

- ``--writers`` client threads, each streaming IndexImages calls of 1-24 new images (unique
  96x96 texture mosaics; a stream longer than the server's 16-image chunk commits in parts);
- one client thread deleting 1-3 images whose IndexImages it saw acknowledged.

and is killed with SIGKILL at a *kill point*:

- ``random``: by this process, 0-1.5 s (uniform) after the round's first acknowledged
  IndexImages (mostly inside a segmentation or a commit, since those take the time);
- ``after_lmdb_commit``: by itself, right after its k-th LMDB commit (k random in 2..8), i.e.
  after the write is durable but before FAISS is updated and before the client is answered;
- ``mid_faiss_save``: by itself, in the k-th `vectors.faiss` save (k in 2..8), after the temp file is
  written and fsynced and before the rename.

A ledger records every image's state as the clients saw it: acknowledged added (with its
segment ids), acknowledged deleted, or unknown (the call was cut by the kill). After each
kill the server is restarted (that start repairs FAISS from LMDB) and the index is checked:

- `segsearch index verify INDEX` passes (run in-process: the command's own code);
- **lost**: an acknowledged image missing, with other segment ids, or a segment of it missing
  in LMDB or in the FAISS file, or (sampled, 12 per check) not found by SearchSimilar by id;
- **reappeared**: an acknowledged delete (or an image found absent before) present again, in
  LMDB, in the FAISS file, or (sampled, 6 per check) as a hit of a search by its own pixels;
- **half**: an image record whose segments are not all in LMDB and FAISS, or FAISS ids that
  LMDB lacks. An unknown image must be fully present or fully absent; it is then resolved
  into the ledger, so later rounds hold it to what was found (absent must stay absent).

After the last round the server is stopped with SIGTERM and the index reopened in-process
(one more restart) and checked again. Counts are over all rounds.

Usage (bench/faults.py runs this): python bench/faults.py [--rounds 12] [--seed 0] [--writers 2] [--work-dir DIR]
(builds a tiny checkpoint and index in a temp dir, as the service tests do: ~10 s).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from segsearch.indexer.index_store import IndexStore
from segsearch.service.client import SegsearchClient
from segsearch.service.pngs import encode_image_png
from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic

log = logging.getLogger("faults")

KILL_MODES = ("random", "after_lmdb_commit", "mid_faiss_save")
IMAGE_SIDE = 96
MAX_STREAM = 24  # > the server's 16-image commit chunk: some streams commit in two parts
SEARCH_SAMPLE, DELETE_SAMPLE = 12, 6
CUT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)

# `segsearch serve` in a child that, for the self-kill modes, SIGKILLs itself at the k-th pass
# through the chosen point (the same hooks as tests/indexer/test_crash_safety.py's child).
SERVER_CHILD = textwrap.dedent("""
    import os, signal, sys
    mode, at, calls = sys.argv[1], int(sys.argv[2]), [0]
    def die_here():
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    if mode == "after_lmdb_commit":
        from segsearch.indexer.metadata_store import MetadataStore
        write = MetadataStore._write
        def _write(self, body):
            write(self, body)
            die_here()
        MetadataStore._write = _write
    elif mode == "mid_faiss_save":
        replace = os.replace
        def _replace(src, dst):
            if str(dst).endswith("vectors.faiss"):
                die_here()
            replace(src, dst)
        os.replace = _replace
    from segsearch.cli import main
    sys.exit(main(sys.argv[3:]))
""")


# ---- the server child --------------------------------------------------------------------

class ServerProcess:
    """A `segsearch serve` child; `address` once it printed its serving line."""

    def __init__(self, index_dir: Path, checkpoint: Path, mode: str = "none", at: int = 0):
        argv = [sys.executable, "-c", SERVER_CHILD, mode, str(at), "serve", str(index_dir),
                "--model", str(checkpoint), "--port", "0", "--no-metrics", "--grace", "5",
                "--max-concurrent-writes", "8"]  # above the rounds' concurrent writers: a refusal is a finding
        if mode == "mid_faiss_save":  # FAISS snapshots after every commit, so that the kill point comes
            argv += ["--save-every", "1"]
        self.mode = mode
        self.lines: list[str] = []
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.address = self._wait_for_address()

    def _wait_for_address(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = re.search(r"serving .* on (\S+?):(\d+)", line)
            if match:
                threading.Thread(target=self._drain, daemon=True).start()
                return f"{match.group(1)}:{match.group(2)}"
        self.kill()
        raise RuntimeError("segsearch serve did not start:\n" + "".join(self.lines[-30:]))

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self) -> int:
        """SIGTERM (drain, flush FAISS, exit 0)."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


# ---- the clients' ledger -----------------------------------------------------------------

@dataclass
class Entry:
    data: bytes
    state: str  # adding | added | deleting | deleted | absent
    segment_ids: list[int] = field(default_factory=list)


class Ledger:
    """What the clients know about every image they sent (thread-safe)."""

    def __init__(self):
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()
        self.acked_adds = self.acked_deletes = 0
        self.unexpected: list[str] = []

    def begin_add(self, items: list[tuple[str, bytes]]) -> None:
        with self.lock:
            for image_id, data in items:
                self.entries[image_id] = Entry(data, "adding")

    def acked_add(self, response) -> None:
        with self.lock:
            for item in response.indexed:
                self.entries[item.image_id].state = "added"
                self.entries[item.image_id].segment_ids = list(item.segment_ids)
                self.acked_adds += 1
            for item in response.skipped:  # duplicate content: acknowledged as not added
                self.entries[item.image_id].state = "absent"

    def pick_added(self, rng: random.Random, count: int) -> list[str]:
        with self.lock:
            added = [i for i, e in self.entries.items() if e.state == "added"]
            chosen = rng.sample(added, min(count, len(added)))
            for image_id in chosen:
                self.entries[image_id].state = "deleting"
            return chosen

    def acked_delete(self, image_ids: list[str]) -> None:
        with self.lock:
            for image_id in image_ids:
                self.entries[image_id].state = "deleted"
                self.acked_deletes += 1

    def cut(self, error: grpc.RpcError, what: str) -> None:
        """A call ended by the kill is expected; any other failure is a finding."""
        if error.code() not in CUT_CODES:
            with self.lock:
                self.unexpected.append(f"{what}: {error.code().name}: {error.details()}")


def mosaic_pngs(seed: int, count: int) -> list[bytes]:
    mosaic = TextureMosaic(MosaicConfig(size=IMAGE_SIDE, num_images=count, seed=seed, split="test"))
    return [encode_image_png(mosaic[n].image) for n in range(count)]


def _writer(address: str, ledger: Ledger, prefix: str, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    with SegsearchClient(address, timeout=120) as client:
        for batch in range(10_000):
            if stop.is_set():
                return
            count = rng.randint(1, MAX_STREAM)
            items = [(f"{prefix}-b{batch}-{n}", data)
                     for n, data in enumerate(mosaic_pngs(rng.randrange(1 << 30), count))]
            ledger.begin_add(items)
            try:
                ledger.acked_add(client.index_images(items))
            except grpc.RpcError as error:
                return ledger.cut(error, "IndexImages")


def _deleter(address: str, ledger: Ledger, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    with SegsearchClient(address, timeout=120) as client:
        while not stop.is_set():
            image_ids = ledger.pick_added(rng, rng.randint(1, 3))
            if not image_ids:
                time.sleep(0.05)
                continue
            try:
                client.delete_images(image_ids)
            except grpc.RpcError as error:
                return ledger.cut(error, "DeleteImages")
            ledger.acked_delete(image_ids)
            time.sleep(rng.uniform(0.0, 0.1))


# ---- checks --------------------------------------------------------------------------------

@dataclass
class Check:
    lost: int = 0
    reappeared: int = 0
    half: int = 0
    unacked_present: int = 0
    unacked_absent: int = 0
    verify_failed: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, other: Check) -> None:
        for name in ("lost", "reappeared", "half", "unacked_present", "unacked_absent", "verify_failed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems += other.problems


def run_verify(index_dir: Path) -> tuple[int, str]:
    """`segsearch index verify INDEX_DIR` through the CLI's own code; (exit status, output)."""
    from segsearch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["index", "verify", str(index_dir)])
    return code, out.getvalue() + err.getvalue()


def check_index(index_dir: Path, ledger: Ledger, address: str | None, rng: random.Random) -> Check:
    """Compare the index on disk (and the server at `address`) with the ledger; resolve unknowns."""
    check = Check()
    code, output = run_verify(index_dir)
    if code != 0:
        check.verify_failed = 1
        check.problems.append(f"verify: {output.strip()}")
    with IndexStore.open(index_dir, read_only=True, repair=False) as store:
        lmdb_ids, faiss_ids = (set(ids.tolist()) for ids in store.segment_ids())
        orphans = faiss_ids - lmdb_ids
        if orphans:
            check.half += len(orphans)
            check.problems.append(f"FAISS ids without LMDB records: {sorted(orphans)[:10]}")
        for image_id, entry in ledger.entries.items():
            _check_entry(store, image_id, entry, lmdb_ids, faiss_ids, check)
    if address is not None:
        _check_through_server(address, ledger, rng, check)
    return check


def _check_entry(store: IndexStore, image_id: str, entry: Entry, lmdb_ids: set, faiss_ids: set,
                 check: Check) -> None:
    record = store.get_image(image_id) if store.has_image(image_id) else None
    stored = list(record.segment_ids) if record else []
    complete = record is not None and all(s in lmdb_ids and s in faiss_ids for s in stored)
    if record is not None and not complete:
        check.half += 1
        check.problems.append(f"{image_id}: image record without all its segments in LMDB and FAISS")
    if entry.state == "added" and (not complete or stored != entry.segment_ids):
        check.lost += 1
        check.problems.append(f"{image_id}: acknowledged add lost (stored segments {stored})")
    elif entry.state in ("deleted", "absent"):
        traces = record is not None or any(s in lmdb_ids or s in faiss_ids for s in entry.segment_ids)
        if traces:
            check.reappeared += 1
            check.problems.append(f"{image_id}: {entry.state} image is back")
    elif entry.state in ("adding", "deleting"):  # cut by the kill: all or nothing, then held to it
        if complete:
            check.unacked_present += 1
            entry.state, entry.segment_ids = "added", stored
        else:
            check.unacked_absent += 1
            entry.state = "absent"


def _check_through_server(address: str, ledger: Ledger, rng: random.Random, check: Check) -> None:
    added = [(i, e) for i, e in ledger.entries.items() if e.state == "added" and e.segment_ids]
    gone = [(i, e) for i, e in ledger.entries.items() if e.state == "deleted"]
    with SegsearchClient(address, timeout=60) as client:
        for image_id, entry in rng.sample(added, min(SEARCH_SAMPLE, len(added))):
            segment_id = rng.choice(entry.segment_ids)
            level = client.get_segment(segment_id).level  # searched at its own level, it comes first
            hits = client.search_segment(segment_id, top_k=5, level=level).hits
            if segment_id not in [hit.segment_id for hit in hits]:
                check.lost += 1
                check.problems.append(f"{image_id}: segment {segment_id} not found by SearchSimilar")
        for image_id, entry in rng.sample(gone, min(DELETE_SAMPLE, len(gone))):
            hits = client.search_box(entry.data, (0, 0, IMAGE_SIDE, IMAGE_SIDE), top_k=5).hits
            if image_id in [hit.image_id for hit in hits]:
                check.reappeared += 1
                check.problems.append(f"{image_id}: deleted image found by a search by its pixels")


# ---- rounds --------------------------------------------------------------------------------

@dataclass
class RoundResult:
    mode: str
    acked_adds: int
    acked_deletes: int
    check: Check
    seconds: float
    self_killed: bool = True


def _kill_at(mode: str, rng: random.Random) -> int:
    # mid_faiss_save: the start's own save (after a repair) is pass 1
    return {"after_lmdb_commit": rng.randint(2, 8), "mid_faiss_save": rng.randint(2, 8)}.get(mode, 0)


def _wait_for_an_acknowledged_add(ledger: Ledger, before: int, timeout: float = 30.0) -> None:
    """So that every random round has acknowledged writes to lose."""
    deadline = time.monotonic() + timeout
    while ledger.acked_adds == before and time.monotonic() < deadline:
        time.sleep(0.02)


def _run_clients_until_killed(server: ServerProcess, ledger: Ledger, writers: int, round_no: int,
                              rng: random.Random) -> bool:
    """Clients against `server` until it dies; True if it killed itself (its kill point)."""
    stop = threading.Event()
    threads = [threading.Thread(target=_writer, args=(server.address, ledger, f"r{round_no}w{w}",
                                                      rng.randrange(1 << 30), stop)) for w in range(writers)]
    threads.append(threading.Thread(target=_deleter, args=(server.address, ledger, rng.randrange(1 << 30), stop)))
    for thread in threads:
        thread.start()
    self_killed = True
    if server.mode == "random":
        _wait_for_an_acknowledged_add(ledger, ledger.acked_adds)
        time.sleep(rng.uniform(0.0, 1.5))
        server.kill()
    else:
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self_killed = False  # the kill point was not reached in time: kill it anyway
        server.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    return self_killed


def run_kill_rounds(index_dir: Path, checkpoint: Path, modes: list[str], seed: int = 0,
                    writers: int = 2) -> tuple[list[RoundResult], Check, Ledger]:
    """The rounds (see the module docstring); returns per-round results, the final check, the ledger."""
    rng = random.Random(seed)
    ledger = Ledger()
    results = []
    server = ServerProcess(index_dir, checkpoint, modes[0], _kill_at(modes[0], rng))
    for number, mode in enumerate(modes):
        started = time.perf_counter()
        adds, deletes = ledger.acked_adds, ledger.acked_deletes
        self_killed = _run_clients_until_killed(server, ledger, writers, number, rng)
        following = modes[number + 1] if number + 1 < len(modes) else "none"
        server = ServerProcess(index_dir, checkpoint, following, _kill_at(following, rng))  # the restart
        check = check_index(index_dir, ledger, server.address, rng)
        results.append(RoundResult(mode, ledger.acked_adds - adds, ledger.acked_deletes - deletes, check,
                                   time.perf_counter() - started, self_killed))
        log.info("round %d (%s): %s", number, mode, results[-1])
    final = Check()
    status = server.stop()
    if status != 0:
        final.problems.append(f"segsearch serve exited {status} on SIGTERM")
    with IndexStore.open(index_dir) as store:  # one more restart, as a writer
        if store.verify():
            final.problems.append(f"verify after reopening: {store.verify()}")
    final.add(check_index(index_dir, ledger, None, rng))
    return results, final, ledger


# ---- the bench -------------------------------------------------------------------------------

def build_fixture(work: Path) -> tuple[Path, Path]:
    """A tiny trained checkpoint and an index of 6 images (as tests/service/conftest.py)."""
    import torch

    from segsearch.indexer.decode import DecodeConfig
    from segsearch.indexer.pipeline import IndexConfig, index_corpus
    from segsearch.spml.segmenter import SegmenterConfig
    from segsearch.trainer.config import TrainConfig
    from segsearch.trainer.datasets import DataConfig
    from segsearch.trainer.train import train

    torch.manual_seed(0)
    result = train(TrainConfig(out_dir=str(work / "model"), backbone="small", pretrained=False,
                               edge_source="sobel", steps=3, batch_size=4, progress=False, inference_grid=(4, 4),
                               data=DataConfig(image_size=64, num_train=8, num_test=4)))
    corpus = work / "corpus"
    corpus.mkdir()
    for number, data in enumerate(mosaic_pngs(1, 6)):
        (corpus / f"mosaic{number}.png").write_bytes(data)
    config = IndexConfig(progress=False, decode_workers=1, decode=DecodeConfig(max_side=128),
                         segmenter=SegmenterConfig(embed_size=96, grid=(4, 4)))
    index_corpus(corpus, result.checkpoint_path, work / "index", config)
    return Path(result.checkpoint_path), work / "index"


def format_table(results: list[RoundResult], final: Check) -> str:
    total = Check()
    for result in results:
        total.add(result.check)
    total.add(final)
    header = ("| rounds | kill points (random / after LMDB commit / mid FAISS save) | acknowledged writes "
              "| acknowledged deletes | unacknowledged: present / absent | lost | reappeared | half-written "
              "| verify failures | time |")
    kills = " / ".join(str(sum(r.mode == m for r in results)) for m in KILL_MODES)
    row = (f"| {len(results)} | {kills} | {sum(r.acked_adds for r in results)} "
           f"| {sum(r.acked_deletes for r in results)} | {total.unacked_present} / {total.unacked_absent} "
           f"| {total.lost} | {total.reappeared} | {total.half} | {total.verify_failed} "
           f"| {sum(r.seconds for r in results):.0f} s |")
    rows = [header, "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |", row]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12, help="kill rounds, cycling the kill points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", type=int, default=2, help="IndexImages client threads")
    parser.add_argument("--work-dir", help="where the checkpoint and index go (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="segsearch-faults-") as temp:
        work = Path(args.work_dir or temp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint, index_dir = build_fixture(work)
        modes = [KILL_MODES[n % len(KILL_MODES)] for n in range(args.rounds)]
        results, final, ledger = run_kill_rounds(index_dir, checkpoint, modes, args.seed, args.writers)
    for number, result in enumerate(results):
        c = result.check
        print(f"round {number:>2} {result.mode:<17} adds {result.acked_adds:>4} deletes {result.acked_deletes:>3} "
              f"unacked present/absent {c.unacked_present}/{c.unacked_absent} lost {c.lost} "
              f"reappeared {c.reappeared} half {c.half} verify_failed {c.verify_failed} "
              f"{'' if result.self_killed else '(kill point not reached: killed) '}{result.seconds:.1f} s")
    for problem in [p for r in results for p in r.check.problems] + final.problems + ledger.unexpected:
        print("PROBLEM:", problem)
    print()
    print(format_table(results, final))


if __name__ == "__main__":
    main()
