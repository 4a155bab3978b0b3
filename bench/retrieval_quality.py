"""Retrieval quality on unseen data, measured through the real indexer and server (issue 11 §1).

    python bench/retrieval_quality.py                 # default size, the shipped general model
    python bench/retrieval_quality.py --model runs/x/checkpoint.pt
    python bench/retrieval_quality.py --model demo    # the demo's model (trained once, cached)
    python bench/retrieval_quality.py --quick         # smoke run: tiny data

What it does:
1. data: labelled mosaics of OpenArena game textures (Debian `openarena-081-textures`,
   fetched once with `apt-get download` into bench/out/, see `retrieval_data.py`): classes
   and pictures the model never saw; INDEX and QUERY mosaics use disjoint source textures;
2. model: the shipped general model (spml/models/general.pt), `--model CKPT`, or `--model
   demo`: the demo's model (`segsearch train --supervision scribbles`, 200 steps on the
   built-in mosaic), trained once into bench/out/retrieval/models/;
3. `segsearch index` (the CLI) indexes the INDEX mosaics; `segsearch serve` (the CLI) serves
   them on a free 127.0.0.1 port;
4. every ground-truth region of every QUERY mosaic is asked for by mask, by box (the region's
   bounding box) and by point (its most interior pixel), top_k=10, through the public client;
5. the same indexed segments (masks read back with GetSegment) are ranked by brute force
   with the baselines, for the same query masks (for a box or a point, the region the server
   picked): colour histogram (8x8x8 RGB, L1, cosine), the untrained HED-VGG16's block 3 and
   blocks 3-5 mean-pooled over the mask, chance, and the parts of the model alone (its learned
   part, its colour code) and its recipe with the untrained hypercolumn in place of the head;
6. scores (`retrieval_scoring.py`): precision@10 (a hit counts when its segment's majority
   ground-truth class is the query's), pixel precision, median hit/query area ratio, and the
   server's latency per query kind. Prints the table and per-class rows; writes
   bench/out/retrieval/runs/<data>-<data hash>-<checkpoint hash>/results.json, and a contact
   sheet of the data next to the mosaics.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval_data import (  # noqa: E402
    MosaicSetConfig, build_mosaic_set, contact_sheet, deb_provenance, fetch_textures, load_ground_truth,
)
from retrieval_scoring import (  # noqa: E402
    QueryScore, chance_scores, colour_histogram, latency_percentiles, rank_by_cosine, score_hits, summarise,
)

from segsearch.spml.checkpoint import resolve_checkpoint  # noqa: E402
from segsearch.service._generated import segment_search_pb2 as pb  # noqa: E402
from segsearch.service.client import level_number  # noqa: E402

log = logging.getLogger("retrieval_quality")
BENCH_DIR = Path(__file__).resolve().parent
KINDS = ("mask", "box", "point")
METHODS = ("model", "model_bruteforce", "model_learned", "model_colour", "hypercolumn_colour",
           "colour_histogram", "backbone", "backbone_345", "chance")
METHOD_NAMES = {"model": "ours (server)", "model_bruteforce": "ours, brute force",
                "model_learned": "ours, learned part", "model_colour": "ours, colour part",
                "hypercolumn_colour": "untrained hc + colour", "colour_histogram": "colour hist",
                "backbone": "backbone b3 (untr.)", "backbone_345": "backbone b3-5 (untr.)",
                "chance": "chance"}
QUICK = dict(num_index=16, num_query=6, train_steps=20)
# the layout of indexes this bench builds: fine segments and regions, borders snapped to the
# contours (a cached index of an older layout is not reused)
INDEX_LAYOUT = "snapped"


@dataclass
class BenchConfig:
    """Every knob of the benchmark; the argparse flags take their defaults from here."""

    out_dir: str = str(BENCH_DIR / "out" / "retrieval")
    model: str = ""  # checkpoint; empty = the shipped general model; "demo" = the demo's model
    train_steps: int = 200  # the demo's default, when training the demo's model
    supervision: str = "scribbles"
    top_k: int = 10
    kinds: tuple[str, ...] = KINDS
    num_index: int = 144
    num_query: int = 48
    image_size: int = 256
    seed: int = 11
    embed_threads: int = 2  # torch threads for the backbone baseline
    server_timeout_s: float = 300.0
    quick: bool = False
    level: str = "default"  # which indexed segments the server returns and every method ranks
    mosaic: MosaicSetConfig = field(init=False)

    def __post_init__(self) -> None:
        self.mosaic = MosaicSetConfig(size=self.image_size, num_index=self.num_index,
                                      num_query=self.num_query, seed=self.seed)

    @property
    def data_name(self) -> str:
        return f"data-{self.image_size}px-{self.num_index}i-{self.num_query}q-s{self.seed}"


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", default=defaults.out_dir, help="cache and results folder")
    p.add_argument("--model", default=defaults.model,
                   help="checkpoint; default: the shipped general model; 'demo': train the demo's model once")
    p.add_argument("--train-steps", type=int, default=defaults.train_steps, help="steps of the demo model")
    p.add_argument("--supervision", default=defaults.supervision, help="weak labels of the demo model")
    p.add_argument("--top-k", type=int, default=defaults.top_k)
    p.add_argument("--kinds", default=",".join(defaults.kinds), help="query kinds: mask,box,point")
    p.add_argument("--num-index", type=int, default=defaults.num_index, help="INDEX mosaics")
    p.add_argument("--num-query", type=int, default=defaults.num_query, help="QUERY mosaics")
    p.add_argument("--image-size", type=int, default=defaults.image_size, help="mosaic side in pixels")
    p.add_argument("--seed", type=int, default=defaults.seed, help="mosaic seed")
    p.add_argument("--embed-threads", type=int, default=defaults.embed_threads,
                   help="torch threads of the backbone baseline")
    p.add_argument("--server-timeout-s", type=float, default=defaults.server_timeout_s)
    p.add_argument("--level", choices=("default", "fine", "region"), default=defaults.level,
                   help="the level of indexed segments searched (default: the server's, regions)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['num_index']} index / {QUICK['num_query']} query mosaics and, "
                        f"with --model demo, a {QUICK['train_steps']}-step model (overrides those flags)")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig) if f.init}
    values["kinds"] = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(values["kinds"]) - set(KINDS)
    if unknown:
        p.error(f"unknown query kinds {sorted(unknown)}; choose from {KINDS}")
    if args.quick:
        values.update(QUICK)
    return BenchConfig(**values)


# ---- running the CLI -------------------------------------------------------------------------

def segsearch_command() -> list[str]:
    """The `segsearch` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("segsearch")
    if script.exists():
        return [str(script)]
    found = shutil.which("segsearch")
    if found is None:
        raise SystemExit("no `segsearch` command: install the project (scripts/install.sh)")
    return [found]


def run_cli(args: list[str], log_path: Path) -> None:
    log.info("$ segsearch %s  (log: %s)", " ".join(args), log_path)
    started = time.perf_counter()
    with open(log_path, "w") as out:
        done = subprocess.run(segsearch_command() + args, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"`segsearch {' '.join(args)}` failed ({done.returncode}); see {log_path}:\n"
                         + log_path.read_text()[-3000:])
    log.info("done in %.0f s", time.perf_counter() - started)


def demo_checkpoint(config: BenchConfig, out_dir: Path) -> Path:
    """The demo's model (`segsearch train`, built-in mosaic), trained once per steps/supervision."""
    run_dir = out_dir / "models" / f"demo-{config.supervision}-{config.train_steps}"
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        run_cli(["train", "--supervision", config.supervision, "--steps", str(config.train_steps),
                 "--out", str(run_dir), "--no-progress"], run_dir / "train.log")
    return checkpoint


def checkpoint_tag(checkpoint: Path) -> str:
    """Short content hash of a checkpoint file (names its index folder)."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def build_index(data_dir: Path, checkpoint: Path, run_dir: Path) -> tuple[Path, float]:
    """`segsearch index` over the INDEX mosaics (reused when complete); returns dir and seconds."""
    index_dir = run_dir / "index"
    done_marker = run_dir / "index.done"
    if done_marker.exists():
        return index_dir, float(done_marker.read_text())
    started = time.perf_counter()
    run_cli(["index", str(data_dir / "index"), "--model", str(checkpoint), "--out", str(index_dir)],
            run_dir / "index.log")
    seconds = time.perf_counter() - started
    done_marker.write_text(f"{seconds:.1f}")
    return index_dir, seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedIndex:
    """`segsearch serve INDEX --model CKPT` in a child process on a free loopback port."""

    def __init__(self, index_dir: Path, checkpoint: Path, log_path: Path, timeout_s: float):
        self.address = f"127.0.0.1:{free_port()}"
        self.args = ["serve", str(index_dir), "--model", str(checkpoint), "--host", "127.0.0.1",
                     "--port", self.address.rsplit(":", 1)[1], "--no-metrics"]
        self.log_path, self.timeout_s = log_path, timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self):
        from segsearch.service.client import SegsearchClient

        log.info("$ segsearch %s", " ".join(self.args))
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(segsearch_command() + self.args, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self.client = SegsearchClient(self.address, timeout=120.0)
        if not self._wait_until_serving():
            self.__exit__()
            tail = self.log_path.read_text()[-3000:]
            raise SystemExit(f"the server did not come up; see {self.log_path}:\n{tail}")
        return self

    def _wait_until_serving(self) -> bool:
        """Poll health until SERVING; False when the child exits or the timeout passes."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.client.wait_until_serving(timeout=2.0)
                return True
            except TimeoutError:
                continue
        return False

    def __exit__(self, *exc) -> None:
        self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# ---- candidates (the indexed segments) and queries --------------------------------------------

@dataclass
class Candidate:
    segment_id: int
    image_id: str
    mask: np.ndarray  # (H, W) bool, indexed-image pixels
    class_pixels: np.ndarray  # (C,) ground-truth pixels of each class under the mask
    prototype: np.ndarray  # (D,) the unit-norm vector the index searches


@dataclass
class Query:
    image_id: str
    class_index: int
    region: np.ndarray  # (H, W) bool ground-truth region
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), end-exclusive: the region's bounding box
    point: tuple[int, int]  # (x, y): the region's most interior pixel


def png_to_mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))) > 0


def mask_to_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def read_candidates(client, data_dir: Path, num_classes: int, level: int) -> list[Candidate]:
    """Every indexed segment of `level` (a pb.Level) with its mask (GetSegment) and its
    ground-truth class counts.

    Segment ids are allocated upwards from 1 and never reused; a fresh index has exactly
    ids 1..N, but absent ids are skipped, so this also works after deletions.
    """
    import grpc

    expected = client.info().num_segments
    truths: dict[str, np.ndarray] = {}
    candidates: list[Candidate] = []
    segment_id, misses, read = 0, 0, 0
    while read < expected and misses < 10_000:
        segment_id += 1
        try:
            record = client.get_segment(segment_id, include_prototype=True)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            misses += 1
            continue
        read += 1
        if record.level != level:
            continue
        if record.image_id not in truths:
            truths[record.image_id] = load_ground_truth(data_dir, "index", record.image_id)
        mask = png_to_mask(record.mask_png)
        truth = truths[record.image_id]
        if mask.shape != truth.shape:
            raise SystemExit(f"segment {segment_id}: mask {mask.shape} vs ground truth {truth.shape} "
                             f"of {record.image_id}; the indexer resized the image")
        candidates.append(Candidate(segment_id, record.image_id, mask,
                                    np.bincount(truth[mask], minlength=num_classes),
                                    np.asarray(record.prototype, dtype=np.float32)))
    log.info("read %d indexed segments of %d images at level %s", len(candidates), len(truths),
             pb.Level.Name(level))
    return candidates


def make_queries(data_dir: Path, image_ids: list[str]) -> list[Query]:
    """One query per ground-truth region of every QUERY mosaic."""
    from scipy.ndimage import distance_transform_edt

    queries = []
    for image_id in image_ids:
        truth = load_ground_truth(data_dir, "query", image_id)
        for class_index in np.unique(truth):
            region = truth == class_index
            ys, xs = np.nonzero(region)
            inside = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(np.argmax(inside)), region.shape)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            queries.append(Query(image_id, int(class_index), region, box, (int(x), int(y))))
    return queries


@dataclass
class ServedQuery:
    """What the server answered for one (query, kind)."""

    segment_ids: list[int]
    seconds: float
    query_mask: np.ndarray  # the region the server searched with (for a point: its over-segment)


def ask_server(client, image_png: bytes, query: Query, kind: str, top_k: int, level: int) -> ServedQuery:
    """One timed SearchSimilar. Boxes and points ask for masks too: the region the server picked
    comes back with them, and the baselines query with that same region."""
    started = time.perf_counter()
    if kind == "mask":
        response = client.search_mask(image_png, mask_to_png(query.region), top_k=top_k, level=level)
    elif kind == "box":
        response = client.search_box(image_png, query.box, top_k=top_k, include_masks=True, level=level)
    else:
        response = client.search_point(image_png, query.point, top_k=top_k, include_masks=True, level=level)
    seconds = time.perf_counter() - started
    used = query.region if kind == "mask" else png_to_mask(response.query_mask_png)
    return ServedQuery([hit.segment_id for hit in response.hits], seconds, used)


# ---- baselines ---------------------------------------------------------------------------------

# per-pixel maps mean-pooled over every mask (`BaselineDescriptors.maps`), and what each holds
MAP_NAMES = ("block3", "blocks345", "hypercolumn", "lab", "embedding")


class BaselineDescriptors:
    """Mean-pooled maps of an image for every mask, image by image (one image cached):

    - block3 / blocks345: the untrained HED-VGG16's block 3 (the issue's backbone baseline) and
      blocks 3-5 (the hypercolumn of the first models), raw, resampled to stride 4;
    - hypercolumn: the model's own head input (its blocks, normalised per block when the model
      does), each pixel L2-normalised: the untrained counterpart of the learned part;
    - lab: the soft Lab colour code (`spml/colour.py`, the model's bins, else 6);
    - embedding: the model's unit pixel embeddings (a check of the server).
    The image is resized to the indexer's square embed size first, as the indexer does.
    """

    def __init__(self, checkpoint: Path, embed_size: int, threads: int):
        import torch

        from segsearch.spml.checkpoint import load_checkpoint
        from segsearch.spml.vgg import build_backbone

        torch.set_num_threads(threads)
        self.model = load_checkpoint(checkpoint).build_model()
        self.raw_backbone = build_backbone("vgg16", True, num_blocks=5).eval()
        self.embed_size = embed_size
        self.colour_bins = self.model.config.colour_bins or 6
        self._key, self._maps = "", {}

    def colour(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return colour_histogram(image[mask])

    def means(self, key: str, image: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        """{map name: (S, C) means over the S full-resolution masks (S, H, W) of one image}."""
        maps = self.maps(key, image)
        return {name: mask_means(values, masks) for name, values in maps.items()}

    def maps(self, key: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """{map name: (C, h, w)} of one image at stride 4 of the embed size."""
        import torch
        import torch.nn.functional as F

        from segsearch.spml.colour import pooled_lab_code
        from segsearch.spml.embedding import OUTPUT_STRIDE, _resample

        if key != self._key:
            resized = np.asarray(Image.fromarray(image).resize((self.embed_size, self.embed_size),
                                                               Image.Resampling.BILINEAR))
            with torch.no_grad():
                tensor = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].float()
                features = self.model.features(tensor)
                size = features.shape[-2:]
                blocks = self.raw_backbone(tensor)
                hypercolumn = F.normalize(features[:, : self.model.head_channels], dim=1)
                self._maps = {
                    "block3": _resample(blocks[2], size),
                    "blocks345": torch.cat([_resample(blocks[b], size) for b in (2, 3, 4)], dim=1),
                    "hypercolumn": hypercolumn,
                    "lab": pooled_lab_code(tensor, self.colour_bins, OUTPUT_STRIDE),
                    "embedding": self.model.embed_features(features),
                }
            self._maps = {name: value[0].numpy() for name, value in self._maps.items()}
            self._key = key
        return self._maps


def mask_mean(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of (C, h, w) maps over a full-resolution mask, weighted by each cell's covered area."""
    return mask_means(maps, mask[None])[0]


def mask_means(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(S, C) means of (C, h, w) maps over S full-resolution masks (S, H, W), area-weighted."""
    import torch
    import torch.nn.functional as F

    weights = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None],
                            size=maps.shape[1:], mode="area")[:, 0].numpy()
    for index in np.flatnonzero(weights.sum(axis=(1, 2)) <= 0):  # thinner than a cell: nearest cell
        ys, xs = np.nonzero(masks[index])
        row = int(ys.mean() * maps.shape[1] / masks.shape[1])
        weights[index, row, int(xs.mean() * maps.shape[2] / masks.shape[2])] = 1
    flat = weights.reshape(len(masks), -1)
    return flat @ maps.reshape(maps.shape[0], -1).T / flat.sum(axis=1, keepdims=True)


def method_descriptors(means: dict[str, np.ndarray], prototypes: np.ndarray, colour: np.ndarray,
                       embedding_dim: int, colour_weight: float) -> dict[str, np.ndarray]:
    """Per ranked method, (S, D) descriptors of S regions, cosine-ranked by `rank_by_cosine`.

    `prototypes` (S, D_model) are the model's vectors of the regions (the server's for indexed
    segments, the mean embedding for queries); its first `embedding_dim` values are the learned
    part. "hypercolumn_colour" is the model's recipe with the untrained hypercolumn in place of
    the learned head, at the model's colour weight (0.5 for a model without a colour code).
    """
    weight = colour_weight or 0.5
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    return {
        "model_bruteforce": prototypes,
        "model_learned": prototypes[:, :embedding_dim],
        "model_colour": means["lab"],
        "colour_histogram": colour,
        "backbone": means["block3"],
        "backbone_345": means["blocks345"],
        "hypercolumn_colour": np.concatenate([(1 - weight) ** 0.5 * unit(means["hypercolumn"]),
                                              weight ** 0.5 * unit(means["lab"])], axis=1),
    }


def candidate_descriptors(candidates: list[Candidate], data_dir: Path, baselines: BaselineDescriptors,
                          embedding_dim: int, colour_weight: float) -> dict[str, np.ndarray]:
    """{method: (N, D)} descriptors of every candidate, image by image."""
    by_image: dict[str, list[int]] = defaultdict(list)
    for number, candidate in enumerate(candidates):
        by_image[candidate.image_id].append(number)
    matrices: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for done, (image_id, numbers) in enumerate(sorted(by_image.items()), start=1):
        image = np.asarray(Image.open(data_dir / "index" / image_id).convert("RGB"))
        masks = np.stack([candidates[n].mask for n in numbers])
        colour = np.stack([baselines.colour(image, mask) for mask in masks])
        prototypes = np.stack([candidates[n].prototype for n in numbers])
        described = method_descriptors(baselines.means("index/" + image_id, image, masks), prototypes,
                                       colour, embedding_dim, colour_weight)
        for method, values in described.items():
            if method not in matrices:
                matrices[method] = np.zeros((len(candidates), values.shape[1]), dtype=np.float32)
            matrices[method][numbers] = values
        if done % 24 == 0:
            log.info("baseline descriptors: %d/%d images, %.0f s", done, len(by_image),
                     time.perf_counter() - started)
    return matrices


# ---- the run -------------------------------------------------------------------------------------

def run(config: BenchConfig) -> dict:
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = list(config.mosaic.classes)

    textures_root = fetch_textures(out_dir)
    data_dir = build_mosaic_set(config.mosaic, textures_root, out_dir / config.data_name)
    sheet = contact_sheet(config.mosaic, textures_root, data_dir, data_dir / "contact_sheet.png")
    log.info("contact sheet: %s", sheet)
    manifest = json.loads((data_dir / "dataset.json").read_text())

    checkpoint = demo_checkpoint(config, out_dir) if config.model == "demo" else resolve_checkpoint(config.model)
    # the folder names the exact data (its manifest's hash) and checkpoint, so a cached index is never stale
    data_tag = hashlib.sha256((data_dir / "dataset.json").read_bytes()).hexdigest()[:8]
    run_dir = out_dir / "runs" / f"{config.data_name}-{data_tag}-{checkpoint_tag(checkpoint)}-{INDEX_LAYOUT}"
    run_dir.mkdir(parents=True, exist_ok=True)
    index_dir, index_seconds = build_index(data_dir, checkpoint, run_dir)

    query_ids = [item["image_id"] for item in manifest["images"]["query"]]
    queries = make_queries(data_dir, query_ids)
    log.info("%d query regions in %d query mosaics", len(queries), len(query_ids))
    served: dict[str, list[ServedQuery]] = {kind: [] for kind in config.kinds}
    with ServedIndex(index_dir, checkpoint, run_dir / "serve.log", config.server_timeout_s) as server:
        info = server.client.info()
        level = info.default_level if config.level == "default" else level_number(config.level)
        candidates = read_candidates(server.client, data_dir, len(class_names), level)
        images_png = {image_id: (data_dir / "query" / image_id).read_bytes() for image_id in query_ids}
        for kind in config.kinds:
            started = time.perf_counter()
            for query in queries:
                image_png = images_png[query.image_id]
                served[kind].append(ask_server(server.client, image_png, query, kind, config.top_k, level))
            log.info("%s queries: %d in %.0f s", kind, len(queries), time.perf_counter() - started)

    scores = score_everything(config, data_dir, index_dir, checkpoint, candidates, queries, served)
    results = {
        "command": " ".join(["python", "bench/retrieval_quality.py"] + sys.argv[1:]),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "mosaic"},
        "mosaic": dataclasses.asdict(config.mosaic),
        "data": {**describe_data(manifest, queries, candidates, class_names), **deb_provenance(out_dir)},
        "model": {"checkpoint": str(checkpoint), "model_version": info.model_version},
        "index": {"segments": len(candidates), "images": info.num_images, "faiss": info.faiss_index,
                  "build_seconds": round(index_seconds, 1)},
        **scores,
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(format_report(results, class_names))
    print(f"\nresults: {run_dir / 'results.json'}\ncontact sheet: {sheet}")
    return results


def score_everything(config, data_dir, index_dir, checkpoint, candidates, queries, served) -> dict:
    """Scores of the server's rankings and of the brute-force rankings of every other method."""
    by_id = {c.segment_id: c for c in candidates}
    class_pixels = np.stack([c.class_pixels for c in candidates])
    baselines = BaselineDescriptors(checkpoint, embed_size_of(index_dir), config.embed_threads)
    model_config = baselines.model.config
    parts = (model_config.embedding_dim, model_config.colour_weight)
    started = time.perf_counter()
    matrices = candidate_descriptors(candidates, data_dir, baselines, *parts)
    log.info("baseline descriptors of %d segments in %.0f s", len(candidates), time.perf_counter() - started)

    per_query = {kind: defaultdict(list) for kind in config.kinds}
    overlap = {kind: [] for kind in config.kinds}  # |server top-k & brute-force top-k| / k
    for number, query in enumerate(queries):  # queries of one image are adjacent: maps cached
        image = np.asarray(Image.open(data_dir / "query" / query.image_id).convert("RGB"))
        for kind in config.kinds:
            answer = served[kind][number]
            means = baselines.means("query/" + query.image_id, image, answer.query_mask[None])
            embedding = means["embedding"] / max(float(np.linalg.norm(means["embedding"])), 1e-12)
            described = method_descriptors(means, embedding, baselines.colour(image, answer.query_mask)[None],
                                           *parts)
            ranked = {"model": [by_id[i].class_pixels for i in answer.segment_ids]}
            for method, descriptor in described.items():
                top = rank_by_cosine(descriptor[0], matrices[method], config.top_k)
                ranked[method] = class_pixels[top]
                if method == "model_bruteforce":
                    top_ids = {candidates[i].segment_id for i in top}
                    overlap[kind].append(len(top_ids & set(answer.segment_ids)) / config.top_k)
            area = float(answer.query_mask.sum())
            for method, hits in ranked.items():
                score = score_hits(query.class_index, area, list(hits), config.top_k)
                per_query[kind][method].append((query.class_index, score))
            chance = chance_scores(query.class_index, area, class_pixels)
            per_query[kind]["chance"].append((query.class_index, chance))
    latency = {kind: latency_percentiles([a.seconds for a in served[kind]]) for kind in config.kinds}
    return {"results": {kind: {method: summary_dict(per_query[kind][method]) for method in METHODS}
                        for kind in config.kinds},
            "latency": latency,
            "server_vs_bruteforce_overlap": {kind: float(np.mean(overlap[kind])) for kind in config.kinds}}


def embed_size_of(index_dir: Path) -> int:
    """The indexer's square embedding input side, as recorded in the index's indexing.json."""
    settings = json.loads((index_dir / "indexing.json").read_text())
    return int(settings["segmenter"]["embed_size"])


def summary_dict(scored: list[tuple[int, QueryScore]]) -> dict:
    overall = summarise(score for _, score in scored)
    classes = sorted({c for c, _ in scored})
    per_class = {c: dataclasses.asdict(summarise(s for k, s in scored if k == c)) for c in classes}
    return {**dataclasses.asdict(overall), "per_class": per_class}


def describe_data(manifest: dict, queries: list[Query], candidates: list[Candidate], class_names) -> dict:
    sources = manifest["sources"]
    regions = defaultdict(int)
    for query in queries:
        regions[class_names[query.class_index]] += 1
    majority = defaultdict(int)
    for candidate in candidates:
        majority[class_names[int(np.argmax(candidate.class_pixels))]] += 1
    return {
        "classes": {name: {"index_textures": sources["index"][name], "query_textures": sources["query"][name],
                           "query_regions": regions[name], "index_segments_majority": majority[name]}
                    for name in class_names},
        "index_images": len(manifest["images"]["index"]),
        "query_images": len(manifest["images"]["query"]),
        "query_regions": len(queries),
    }


def format_report(results: dict, class_names: list[str]) -> str:
    top_k = results["config"]["top_k"]
    data = results["data"]
    lines = [f"retrieval on unseen data: {len(class_names)} classes, {data['index_images']} index mosaics "
             f"({results['index']['segments']} segments), {data['query_regions']} query regions in "
             f"{data['query_images']} query mosaics; model {results['model']['model_version']}", ""]
    header = (f"{'query':6} {'method':22} {'P@' + str(top_k):>7} {'pixel P':>8} {'area ratio':>10} "
              f"{'p50 ms':>8} {'p99 ms':>8}")
    lines += [header, "-" * len(header)]
    for kind, methods in results["results"].items():
        for method in METHODS:
            row = methods[method]
            name = METHOD_NAMES[method]
            timing = results["latency"][kind] if method == "model" else None
            lines.append(f"{kind:6} {name:22} {row['precision_at_k']:7.2f} {row['pixel_precision']:8.2f} "
                         f"{row['area_ratio_median']:10.2f} "
                         + (f"{timing['p50_ms']:8.0f} {timing['p99_ms']:8.0f}" if timing else ""))
    kinds = list(results["results"])
    first = kinds[0]
    overlap = results["server_vs_bruteforce_overlap"]
    lines += ["", f"check: share of the server's top {top_k} also in a brute-force top {top_k} by the "
              "model's own mean embedding of the same query mask: "
              + ", ".join(f"{kind} {value:.2f}" for kind, value in overlap.items())]
    lines += ["", f"per class, P@{top_k}: ours by each query kind | baselines by {kinds[0]}"]
    header = (f"{'class':16} {'n':>3} " + " ".join(f"{k:>6}" for k in kinds)
              + f" | {'colour':>6} {'backb.':>6} {'chance':>6}")
    lines += [header, "-" * len(header)]
    for class_index, name in enumerate(class_names):
        per_class = results["results"][first]["model"]["per_class"]
        key = class_index if class_index in per_class else str(class_index)  # str once read from JSON
        rows = {kind: results["results"][kind]["model"]["per_class"].get(key) for kind in kinds}
        if rows[first] is None:
            continue
        base = {m: results["results"][first][m]["per_class"][key]["precision_at_k"]
                for m in ("colour_histogram", "backbone", "chance")}
        lines.append(f"{name:16} {rows[first]['num_queries']:3d} "
                     + " ".join(f"{rows[k]['precision_at_k']:6.2f}" for k in kinds)
                     + f" | {base['colour_histogram']:6.2f} {base['backbone']:6.2f} {base['chance']:6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    started = time.perf_counter()
    run(config)
    log.info("whole bench: %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
