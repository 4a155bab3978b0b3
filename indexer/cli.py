"""`segsearch index`: build an index from a corpus, add to it, delete from it, verify it, stats.

    segsearch index CORPUS --out INDEX_DIR [--model CKPT] [options]   (build, or finish one)
    segsearch index add INDEX_DIR CORPUS [--model CKPT] [options]
    segsearch index delete INDEX_DIR [--image-id ID ...] [--segment-id N ...]
    segsearch index verify INDEX_DIR [--model CKPT] [--repair]
    segsearch index stats INDEX_DIR [--json]
    segsearch index merge INDEX_DIR [--force]        (merge INDEX_DIR/shards into INDEX_DIR)
    segsearch index images INDEX_DIR [--grep REGEX]  (list image ids)

`index CORPUS --dask local:2|tcp://HOST:8786` indexes on Dask into INDEX_DIR/shards and
merges (indexer/dask_runner.py); verify and stats accept a sharded layout too.

argparse cannot mix a positional CORPUS with sub-commands, so `index CORPUS ...` is the hidden
sub-command `build`: `normalize_index_argv` inserts it when the word after `index` is not one
of the sub-commands (a corpus folder literally named "add" needs `segsearch index build add`).
Segmentation flags left out take the values the index was built with (`indexing.json`), or
the defaults for a new index.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from segsearch.errors import SegsearchError
from segsearch.indexer.config import DEFAULT_LOCAL_WORKERS, DaskConfig, IndexConfig, IndexSettings
from segsearch.indexer.decode import DecodeConfig
from segsearch.spml.config import SegmenterConfig

ACTIONS = ("build", "add", "delete", "verify", "stats", "merge", "images")


def normalize_index_argv(argv: list[str]) -> list[str]:
    """Insert the hidden `build` after `index` when the next word is not a sub-command."""
    argv = list(argv)
    position = next((n for n, token in enumerate(argv) if not token.startswith("-")), None)
    if position is None or argv[position] != "index":
        return argv
    following = argv[position + 1] if position + 1 < len(argv) else None
    if following is None or following in ACTIONS or following in ("-h", "--help"):
        return argv
    return argv[: position + 1] + ["build"] + argv[position + 1:]


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 8x8, got {text!r}") from None
    return rows, cols


def add_index_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "index", help="build and maintain a segment index (FAISS + LMDB)",
        usage="segsearch index CORPUS --out INDEX_DIR [--model CKPT] [options]\n"
              "       segsearch index {add,delete,verify,stats} INDEX_DIR ...",
        description="Segment every image of CORPUS (a folder of JPEG/PNG/WebP/BMP/TIFF images or a "
                    "JSONL manifest of {\"uri\", \"image_id\", \"tags\"}) with the checkpoint, and store "
                    "the segments' prototypes in FAISS and their records in LMDB. Re-running the same "
                    "command after an interruption finishes the job; see also the sub-commands.")
    actions = parser.add_subparsers(dest="index_action", required=True,
                                    metavar="{CORPUS,add,delete,verify,stats,merge,images}")
    build = actions.add_parser("build", prog="segsearch index", help="(default, the word may be left out) index CORPUS into --out",
                               description="Index CORPUS into a new index at --out, or finish the "
                                           "unfinished index there.")
    build.add_argument("corpus", help="folder of images, or a JSONL manifest")
    build.add_argument("--model", help="checkpoint written by `segsearch train` (default: the shipped "
                                       "general model, spml/models/general.pt)")
    build.add_argument("--out", required=True, help="index directory (new, or an unfinished index to complete)")
    build.add_argument("--resume", action="store_true",
                       help="require an existing index at --out and continue it (the same command "
                            "without --resume also continues one)")
    _add_job_flags(build)
    _add_dask_flags(build)
    build.set_defaults(handler=run_build)

    add = actions.add_parser("add", prog="segsearch index add", help="add the images of CORPUS to an existing index",
                             description="Index more images into an existing index (same model "
                                         "version and settings; images already there are skipped).")
    add.add_argument("index_dir", help="existing index directory")
    add.add_argument("corpus", help="folder of images, or a JSONL manifest")
    add.add_argument("--model", help="the checkpoint the index was built with (default: the shipped "
                                     "general model)")
    _add_job_flags(add)
    add.set_defaults(handler=run_add)

    delete = actions.add_parser("delete", prog="segsearch index delete", help="delete images and their segments",
                                description="Remove images and all their segments, or single segments (their "
                                            "images keep the others), from LMDB and FAISS.")
    delete.add_argument("index_dir", help="index directory")
    delete.add_argument("--image-id", action="append", dest="image_ids",
                        help="image id to delete (repeat the flag for several)")
    delete.add_argument("--segment-id", action="append", type=int, dest="segment_ids",
                        help="segment id to delete (repeat the flag for several)")
    delete.set_defaults(handler=run_delete)

    verify = actions.add_parser("verify", prog="segsearch index verify", help="check FAISS/LMDB agreement; non-zero exit on problems",
                                description="Check that FAISS and LMDB hold the same segment ids, that "
                                            "every record has the index's model version, and the counts "
                                            "and links. Prints each problem; exits 1 if there is any.")
    verify.add_argument("index_dir", help="index directory")
    verify.add_argument("--model", help="also check that the index was built with this checkpoint")
    verify.add_argument("--repair", action="store_true",
                        help="first open the index for writing, which repairs FAISS from LMDB after a crash")
    verify.set_defaults(handler=run_verify)

    stats = actions.add_parser("stats", prog="segsearch index stats", help="print counts, model version, index type and sizes",
                               description="Print what the index holds.")
    stats.add_argument("index_dir", help="index directory")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    stats.set_defaults(handler=run_stats)

    images = actions.add_parser("images", prog="segsearch index images", help="list the image ids in the index",
                                description="Print the id of every indexed image, one per line (sorted), "
                                            "optionally only those matching a regular expression.")
    images.add_argument("index_dir", help="index directory (or a sharded layout)")
    images.add_argument("--grep", metavar="REGEX", help="only ids in which this regular expression matches")
    images.set_defaults(handler=run_images)

    merge = actions.add_parser("merge", prog="segsearch index merge", help="merge INDEX_DIR/shards into INDEX_DIR",
                               description="Merge the shards of a distributed index (INDEX_DIR/shards) into one "
                                           "index at INDEX_DIR (ids kept; crash-safe; nothing to do when the "
                                           "merged index is up to date).")
    merge.add_argument("index_dir", help="the --out directory of `segsearch index ... --dask`")
    merge.add_argument("--force", action="store_true",
                       help="replace a merged index that was changed after its merge")
    merge.set_defaults(handler=run_merge)


def _add_job_flags(parser: argparse.ArgumentParser) -> None:
    decode, segmenter, run = DecodeConfig(), SegmenterConfig(), IndexConfig()
    seg = parser.add_argument_group("segmentation (fixed per index; omitted flags take the index's values)")
    seg.add_argument("--max-side", type=int, help=f"longest image side after resizing (default {decode.max_side})")
    seg.add_argument("--max-pixels", type=int,
                     help=f"refuse images with more pixels than this, before decoding (default {decode.max_pixels})")
    seg.add_argument("--embed-size", type=int,
                     help=f"side of the square network input; aspect not preserved (default {segmenter.embed_size})")
    seg.add_argument("--grid", type=_grid,
                     help="k-means grid initialisation ROWSxCOLS, i.e. at most ROWS*COLS segments per "
                          "image (default {}x{})".format(*segmenter.grid))
    seg.add_argument("--kmeans-iterations", type=int, help=f"k-means iterations (default {segmenter.iterations})")
    seg.add_argument("--min-area", type=float,
                     help="segments below this fraction of the image are merged into their neighbour "
                          f"with the longest shared border (default {segmenter.min_area_fraction})")
    seg.add_argument("--knn-k", type=int, help=f"neighbours in the label vote (default {segmenter.knn_k})")
    seg.add_argument("--fine-only", action="store_const", const=False, dest="regions",
                     help="store the fine k-means segments only, no regions (searches of the index then "
                          "return fine segments; a setting of the index, kept by `index add`)")
    seg.add_argument("--index-type",
                     help="auto (exact, then HNSW above 50k segments), flat, hnsw, ivf, or a faiss "
                          f"index_factory string such as 'IVF256,Flat' (default {run.index_type}; fixed at creation)")
    job = parser.add_argument_group("run")
    job.add_argument("--batch-size", type=int, default=run.batch_size,
                     help="images per forward pass (default: %(default)s)")
    job.add_argument("--chunk-size", type=int, default=run.chunk_size,
                     help="images per store commit; a crash redoes at most one chunk (default: %(default)s)")
    job.add_argument("--save-every", type=int, default=run.save_every,
                     help="chunks between FAISS file writes (default: when 5%% of the index or 50k vectors "
                          "changed, or after 5 min; LMDB commits every chunk regardless)")
    job.add_argument("--workers", type=int, default=run.decode_workers,
                     help="decoding threads, 0 = min(4, CPUs) (default: %(default)s)")
    job.add_argument("--device", default=run.device, help="auto, cpu or cuda (default: %(default)s)")
    job.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_dask_flags(parser: argparse.ArgumentParser) -> None:
    dask = parser.add_argument_group("distributed indexing (Dask)")
    dask.add_argument("--dask", metavar="CLUSTER",
                      help="index on Dask into OUT/shards, then merge into OUT: local[:N] starts N worker "
                           f"processes on 127.0.0.1 (default {DEFAULT_LOCAL_WORKERS}), tcp://HOST:8786 uses a running scheduler")
    dask.add_argument("--shards", type=int, help="number of shards (default: one per worker; fixed at creation)")
    dask.add_argument("--retries", type=int, default=DaskConfig.retries,
                      help="re-runs of a failed shard task; each resumes its shard (default: %(default)s)")
    dask.add_argument("--no-merge", action="store_true",
                      help="keep only the sharded layout OUT/shards (servable as is; merge later with "
                           "`segsearch index merge OUT`)")


def index_config(args, index_dir: Path, must_exist: bool) -> IndexConfig:
    """IndexConfig from the flags; omitted segmentation flags from the index's settings."""
    stored = IndexSettings.load(index_dir) or IndexSettings()
    decode = _replace(stored.decode, max_side=args.max_side, max_pixels=args.max_pixels)
    segmenter = _replace(stored.segmenter, embed_size=args.embed_size, grid=args.grid,
                         iterations=args.kmeans_iterations, min_area_fraction=args.min_area, knn_k=args.knn_k,
                         regions=args.regions)
    try:
        return IndexConfig(
            batch_size=args.batch_size, chunk_size=args.chunk_size, decode=decode, segmenter=segmenter,
            index_type=args.index_type or stored.index_type, decode_workers=args.workers,
            device=args.device, progress=not args.no_progress, must_exist=must_exist,
            save_every=args.save_every)
    except ValueError as exc:
        raise SegsearchError(f"invalid setting: {exc}") from None


def _replace(config, **flags):
    """`config` with the flags that were given (not None)."""
    try:
        return dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as exc:
        raise SegsearchError(f"invalid setting: {exc}") from None


def _run_job(corpus: str, model: str, index_dir: str, args, must_exist: bool) -> int:
    from segsearch.indexer.pipeline import index_corpus

    config = index_config(args, Path(index_dir), must_exist)
    summary = index_corpus(corpus, _checkpoint(model), index_dir, config)
    print(summary.format())
    return 0


def _checkpoint(model: str | None) -> str:
    """--model, or the shipped general model."""
    from segsearch.spml.checkpoint import resolve_checkpoint

    return str(resolve_checkpoint(model))


def run_build(args) -> int:
    if args.dask:
        return _run_dask_job(args)
    if args.shards is not None or args.no_merge:
        raise SegsearchError("--shards and --no-merge belong to distributed indexing: add --dask local:2")
    return _run_job(args.corpus, args.model, args.out, args, must_exist=args.resume)


def _run_dask_job(args) -> int:
    from segsearch.indexer.dask_runner import index_distributed
    from segsearch.indexer.shards import MANIFEST, SHARDS_DIR, ShardLayout

    layout = Path(args.out) / SHARDS_DIR  # a re-run takes the shards' settings, as `index` takes OUT's
    settings_dir = ShardLayout.load(layout).shard_dirs[0] if (layout / MANIFEST).exists() else Path(args.out)
    config = index_config(args, settings_dir, must_exist=args.resume)
    try:
        dask = DaskConfig(cluster=args.dask, num_shards=args.shards, retries=args.retries, merge=not args.no_merge)
    except ValueError as exc:
        raise SegsearchError(f"invalid setting: {exc}") from None
    summary = index_distributed(args.corpus, _checkpoint(args.model), args.out, config, dask)
    print(summary.format())
    return 0


def run_merge(args) -> int:
    from segsearch.indexer.merge import merge_shards
    from segsearch.indexer.shards import SHARDS_DIR

    print(merge_shards(Path(args.index_dir) / SHARDS_DIR, args.index_dir, force=args.force).format())
    return 0


def run_add(args) -> int:
    return _run_job(args.corpus, args.model, args.index_dir, args, must_exist=True)


def run_delete(args) -> int:
    from segsearch.indexer.index_store import IndexStore

    from segsearch.errors import IndexStoreError, SegsearchError

    image_ids, segment_ids = args.image_ids or [], args.segment_ids or []
    if not image_ids and not segment_ids:
        raise SegsearchError("name what to delete: --image-id ID and/or --segment-id N (repeatable)")
    with IndexStore.open(args.index_dir) as store:
        unknown = [i for i in image_ids if not store.has_image(i)]
        if unknown:  # before the segments' commit: nothing is deleted
            raise IndexStoreError(f"unknown image id(s), nothing deleted: {', '.join(map(repr, unknown))}")
        removed = store.delete_segments(segment_ids) if segment_ids else []
        removed += store.delete_images(image_ids) if image_ids else []
        meta = store.meta
    print(f"deleted {len(set(image_ids))} images and {len(removed)} segments; the index now holds "
          f"{meta.num_images} images, {meta.num_segments} segments")
    return 0


def run_verify(args) -> int:
    from segsearch.errors import IndexStoreError
    from segsearch.indexer.index_store import IndexStore
    from segsearch.indexer.sharded_store import open_index, shard_dirs_or_self
    from segsearch.spml.checkpoint import load_checkpoint

    problems: list[str] = []
    try:
        if args.repair:
            for index_dir in shard_dirs_or_self(args.index_dir):
                IndexStore.open(index_dir).close()
        with open_index(args.index_dir, read_only=True, repair=False) as store:
            problems = store.verify()
            meta = store.meta
    except IndexStoreError as exc:
        problems = [str(exc)]
        meta = None
    if args.model and meta is not None:
        version = load_checkpoint(args.model).model_version
        if version != meta.model_version:
            problems.append(f"the index holds model version {meta.model_version!r}, "
                            f"the checkpoint {args.model} is version {version!r}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        print(f"index {args.index_dir}: {len(problems)} problem(s) found", file=sys.stderr)
        if not args.repair:
            print(f"if a writer of the index crashed, `segsearch index verify {args.index_dir} --repair` "
                  "repairs FAISS from LMDB (the source of truth) and checks again", file=sys.stderr)
        return 1
    print(f"index {args.index_dir} OK: {meta.num_images} images, {meta.num_segments} segments, "
          f"FAISS and LMDB agree, model version {meta.model_version}")
    return 0


def run_images(args) -> int:
    import re

    from segsearch.indexer.sharded_store import open_index

    try:
        pattern = re.compile(args.grep) if args.grep else None
    except re.error as exc:
        raise SegsearchError(f"--grep {args.grep!r} is not a regular expression: {exc}") from None
    with open_index(args.index_dir, read_only=True) as store:
        ids = sorted(image.image_id for image in store.iter_images())
    for image_id in ids:
        if pattern is None or pattern.search(image_id):
            print(image_id)
    return 0


def run_stats(args) -> int:
    from segsearch.indexer.pipeline import SKIPPED_FILE, SkipReport
    from segsearch.indexer.sharded_store import open_index, settings_dir, shard_dirs_or_self

    with open_index(args.index_dir, read_only=True) as store:
        stats = store.stats().to_json()
    stats["skipped_images"] = sum(len(SkipReport(Path(d) / SKIPPED_FILE).entries())
                                  for d in shard_dirs_or_self(args.index_dir))
    settings = IndexSettings.load(settings_dir(args.index_dir))
    stats["settings"] = None if settings is None else settings.to_json()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        for key, value in stats.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    return 0
