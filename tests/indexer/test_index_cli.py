"""`segsearch index ...`: kill -9 mid-job then the same command, maintenance sub-commands, errors."""
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from segsearch.cli import build_parser, main
from segsearch.indexer.cli import normalize_index_argv
from segsearch.indexer.index_store import LMDB_DIR, IndexStore
from segsearch.indexer.metadata_store import segment_key
from segsearch.indexer.pipeline import index_corpus
from segsearch.spml.checkpoint import load_checkpoint

from indexer_helpers import small_config, write_photos
from model_helpers import other_version_checkpoint, photo, tiny_checkpoint


# The flags that match test_pipeline.small_config() (embed 64, grid 4x4, 5 iterations, ...).
SMALL = ["--embed-size", "64", "--grid", "4x4", "--kmeans-iterations", "5", "--min-area", "0.01",
         "--batch-size", "2", "--chunk-size", "2", "--save-every", "2", "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_corpus")
    return folder, write_photos(folder, flips=True)  # 12 images


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint, corpus):
    out = tmp_path_factory.mktemp("cli_built") / "index"
    assert main(["index", str(corpus[0]), "--model", str(checkpoint), "--out", str(out)] + SMALL) == 0
    return out


def _copy(index: Path, tmp_path: Path) -> Path:
    shutil.copytree(index, tmp_path / "index")
    return tmp_path / "index"


def _run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- kill -9 mid-job, then the same command -----------------------------------------------------

def _index_subprocess(argv, kill_after_commits=None, kill_after_start=None, sleep=0.0):
    """Run `python -m segsearch.cli index ...`; SIGKILL it after N commit lines (or after the
    line saying it continues the index) plus `sleep` seconds. Returns (exit code, commits seen)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see test_pipeline.one_torch_thread
    proc = subprocess.Popen([sys.executable, "-m", "segsearch.cli", "index", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    commits, lines = 0, []
    try:
        for line in proc.stderr:
            lines.append(line)
            commits += "committed chunk" in line
            started = "continuing the index" in line or "created index" in line
            if (kill_after_commits is not None and commits >= kill_after_commits) or \
                    (kill_after_start and started):
                time.sleep(sleep)
                proc.kill()
                break
    finally:
        proc.stderr.close()
        code = proc.wait(timeout=120)
    if code not in (0, -9):
        print("".join(lines[-30:]))  # shown by pytest when the caller's assertion fails
    return code, commits


def test_kill_9_at_several_points_then_same_command_finishes_exactly_once(checkpoint, corpus, tmp_path):
    out = tmp_path / "index"
    argv = [str(corpus[0]), "--model", str(checkpoint), "--out", str(out)] + SMALL
    rng = random.Random(4)
    first, _ = _index_subprocess(argv, kill_after_commits=1)                       # between chunks
    second, _ = _index_subprocess(argv, kill_after_commits=2, sleep=rng.uniform(0, 0.03))  # anywhere
    third, _ = _index_subprocess(argv, kill_after_start=True, sleep=rng.uniform(0, 0.3))   # setup / first batch
    assert first == -9 and second == -9, (first, second, third)
    final, _ = _index_subprocess(argv)
    assert final == 0

    index_corpus(corpus[0], checkpoint, tmp_path / "reference", small_config(chunk_size=2))
    with IndexStore.open(out, read_only=True, repair=False) as store, \
            IndexStore.open(tmp_path / "reference", read_only=True) as ref:
        assert store.verify() == []
        assert (store.meta.num_images, store.meta.num_segments) == (ref.meta.num_images, ref.meta.num_segments)
        assert store.meta.num_images == len(corpus[1])
        for image_id in corpus[1]:
            mine = [store.get_segment(s) for s in store.get_image(image_id).segment_ids]
            theirs = [ref.get_segment(s) for s in ref.get_image(image_id).segment_ids]
            assert [s.box for s in mine] == [s.box for s in theirs]
            np.testing.assert_allclose([s.prototype for s in mine], [s.prototype for s in theirs], atol=1e-5)
    assert main(["index", "verify", str(out)]) == 0


# ---- maintenance sub-commands --------------------------------------------------------------------

def test_stats_prints_counts(built, corpus, capsys):
    code, out, _ = _run_cli(capsys, ["index", "stats", str(built), "--json"])
    stats = json.loads(out)
    assert code == 0 and stats["num_images"] == len(corpus[1])
    assert stats["num_segments"] == stats["faiss_vectors"] > stats["num_images"]
    assert stats["settings"]["segmenter"]["embed_size"] == 64 and stats["skipped_images"] == 0
    code, out, _ = _run_cli(capsys, ["index", "stats", str(built)])
    assert code == 0 and f"num_images: {len(corpus[1])}" in out


def test_verify_passes_then_fails_on_an_lmdb_record_removed_by_hand(built, tmp_path, capsys):
    code, out, _ = _run_cli(capsys, ["index", "verify", str(built)])
    assert code == 0 and "OK" in out
    broken = _copy(built, tmp_path)
    with IndexStore.open(broken, read_only=True) as store:
        victim = int(store.segment_ids()[0][3])
    env = lmdb.open(str(broken / LMDB_DIR), max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"segments")) as txn:
        assert txn.delete(segment_key(victim))
    env.close()
    code, out, err = _run_cli(capsys, ["index", "verify", str(broken)])
    assert code == 1
    assert f"segment id(s) in FAISS but not LMDB: [{victim}]" in out and "problem" in err
    assert f"segsearch index verify {broken} --repair" in err  # what to try after a crash


def test_images_lists_the_ids_and_filters_them(built, corpus, capsys):
    code, out, _ = _run_cli(capsys, ["index", "images", str(built)])
    assert code == 0 and out.splitlines() == sorted(corpus[1])
    code, out, _ = _run_cli(capsys, ["index", "images", str(built), "--grep", "_flip\\.jpg$"])
    assert code == 0 and out.splitlines() == sorted(i for i in corpus[1] if i.endswith("_flip.jpg"))
    code, _, err = _run_cli(capsys, ["index", "images", str(built), "--grep", "("])
    assert code == 2 and "not a regular expression" in err


def test_verify_reports_a_model_mismatch(built, checkpoint, tmp_path, capsys):
    other = other_version_checkpoint(checkpoint, tmp_path / "other.pt")
    code, out, _ = _run_cli(capsys, ["index", "verify", str(built), "--model", str(tmp_path / "other.pt")])
    assert code == 1 and other in out


def test_delete_then_add_back(built, corpus, checkpoint, tmp_path, capsys):
    index = _copy(built, tmp_path)
    victims = corpus[1][:2]
    with IndexStore.open(index, read_only=True) as store:
        before = store.meta
    code, out, _ = _run_cli(capsys, ["index", "delete", str(index), "--image-id", victims[0], "--image-id", victims[1]])
    assert code == 0 and "deleted 2 images" in out
    with IndexStore.open(index, read_only=True) as store:
        assert store.meta.num_images == before.num_images - 2 and store.verify() == []
    code, _, err = _run_cli(capsys, ["index", "delete", str(index), "--image-id", "no-such-image"])
    assert code == 2 and "unknown image id" in err and "Traceback" not in err
    # `index add` takes the index's settings when the flags are left out.
    code, out, _ = _run_cli(capsys, ["index", "add", str(index), str(corpus[0]), "--model", str(checkpoint),
                                     "--no-progress", "--batch-size", "2"])
    assert code == 0 and "indexed 2 images" in out
    with IndexStore.open(index, read_only=True) as store:
        assert (store.meta.num_images, store.meta.num_segments) == (before.num_images, before.num_segments)
        kept = next(store.iter_images())
    single = kept.segment_ids[0]
    code, _, err = _run_cli(capsys, ["index", "delete", str(index), "--segment-id", str(single), "--image-id", "gone"])
    assert code == 2 and "unknown image id" in err  # checked before anything is deleted
    code, out, _ = _run_cli(capsys, ["index", "delete", str(index), "--segment-id", str(single)])
    assert code == 0 and "deleted 0 images and 1 segments" in out
    with IndexStore.open(index, read_only=True) as store:
        assert store.get_image(kept.image_id).segment_ids == kept.segment_ids[1:] and store.verify() == []
        assert (store.meta.num_images, store.meta.num_segments) == (before.num_images, before.num_segments - 1)


def test_fine_only_index_stores_no_regions_and_add_keeps_it_so(built, corpus, checkpoint, tmp_path, capsys):
    """`--fine-only` is a setting of the index: `index add` without the flag keeps it, and asking
    for regions on a fine-only index is refused, naming the setting."""
    out = tmp_path / "fine"
    first = [corpus[0] / name for name in corpus[1][:4]]
    (tmp_path / "some").mkdir()
    for path in first:
        shutil.copy(path, tmp_path / "some" / path.name)
    assert main(["index", str(tmp_path / "some"), "--model", str(checkpoint), "--out", str(out), "--fine-only"]
                + SMALL) == 0
    code, msg, _ = _run_cli(capsys, ["index", "add", str(out), str(corpus[0]), "--model", str(checkpoint),
                                     "--no-progress"])
    assert code == 0 and "indexed 8 images" in msg
    with IndexStore.open(out, read_only=True) as store, IndexStore.open(built, read_only=True) as full:
        ids, _ = store.segment_ids()
        records = [store.get_segment(int(i)) for i in ids]
        assert not store.meta.has_regions and store.verify() == []
        assert {(r.level, r.parent_index, r.parent_id) for r in records} == {(0, -1, 0)}
        full_records = [full.get_segment(int(i)) for i in full.segment_ids()[0]]
        assert len(records) == sum(r.level == 0 for r in full_records)  # the same fine segments
    code, _, err = _run_cli(capsys, ["index", "add", str(_copy(built, tmp_path)), str(corpus[0]),
                                     "--model", str(checkpoint), "--fine-only"])
    assert code == 2 and "segmenter.regions=False (index: True)" in err


def test_add_refuses_other_content_under_a_taken_image_id_with_a_reason(built, corpus, checkpoint, tmp_path,
                                                                        capsys):
    """Two folders both holding `chelsea.jpg`: the second is not dropped without a word."""
    index = _copy(built, tmp_path)
    more = tmp_path / "more"
    more.mkdir()
    Image.fromarray(photo("rocket")).save(more / "chelsea.jpg")  # new content under a taken id
    shutil.copy(corpus[0] / "coffee.png", more / "coffee.png")  # same content under a taken id
    code, out, _ = _run_cli(capsys, ["index", "add", str(index), str(more), "--model", str(checkpoint),
                                     "--no-progress"])
    assert code == 0 and "indexed 0 images" in out and "skipped 1" in out and "1 already indexed" in out
    [entry] = [json.loads(line) for line in (index / "skipped.jsonl").read_text().splitlines()]
    assert entry["image_id"] == "chelsea.jpg" and entry["reason"] == "image_id_taken"
    assert str(more / "chelsea.jpg") in entry["uri"] and "already indexed with other content" in entry["detail"]
    code, out, _ = _run_cli(capsys, ["index", "add", str(index), str(more), "--model", str(checkpoint),
                                     "--no-progress"])
    assert (index / "skipped.jsonl").read_text().count("image_id_taken") == 1  # still listed, once


def test_other_model_version_is_refused_in_one_line(built, corpus, checkpoint, tmp_path, capsys):
    other = other_version_checkpoint(checkpoint, tmp_path / "other.pt")
    mine = load_checkpoint(checkpoint).model_version
    code, _, err = _run_cli(capsys, ["index", "add", str(built), str(corpus[0]), "--model", str(tmp_path / "other.pt")])
    assert code == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if "error" in line]
    assert len(error) == 1 and other in error[0] and mine in error[0]


def test_resume_and_add_need_an_existing_index(corpus, checkpoint, tmp_path, capsys):
    for argv in (["index", str(corpus[0]), "--model", str(checkpoint), "--out", str(tmp_path / "x"), "--resume"],
                 ["index", "add", str(tmp_path / "x"), str(corpus[0]), "--model", str(checkpoint)]):
        code, _, err = _run_cli(capsys, argv)
        assert code == 2 and "no segsearch index" in err
    code, out, _ = _run_cli(capsys, ["index", "verify", str(tmp_path / "x")])
    assert code == 1 and "PROBLEM: no segsearch index" in out


# ---- argument handling -----------------------------------------------------------------------

def test_index_word_before_corpus_is_optional():
    assert normalize_index_argv(["index", "/c", "--out", "o"]) == ["index", "build", "/c", "--out", "o"]
    assert normalize_index_argv(["-v", "index", "--model", "m", "/c"])[:3] == ["-v", "index", "build"]
    for unchanged in (["index", "add", "i", "c"], ["index", "stats", "i"], ["index", "-h"], ["index"],
                      ["train", "index"], ["-v", "index", "verify", "i"]):
        assert normalize_index_argv(unchanged) == unchanged


def test_unavailable_device_is_a_one_line_error(built, corpus, checkpoint, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _run_cli(capsys, ["index", str(corpus[0]), "--model", str(checkpoint),
                                     "--out", str(tmp_path / "x"), "--device", "cuda"] + SMALL[:-1])
    assert code == 2 and "CUDA is not available" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # refused before anything was created


def test_help_explains_every_flag():
    parser = build_parser()
    index = next(a for a in parser._actions if a.dest == "command").choices["index"]
    actions = next(a for a in index._actions if a.dest == "index_action")
    assert set(actions.choices) == {"build", "add", "delete", "verify", "stats", "merge", "images"}
    for name, sub in actions.choices.items():
        undocumented = [a.option_strings or a.dest for a in sub._actions
                        if a.dest != "help" and not (a.help and len(a.help) > 3)]
        assert not undocumented, (name, undocumented)
