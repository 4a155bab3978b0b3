"""`segsearch serve`, `segsearch route`, `segsearch query`, `segsearch segment`.

The bearer token is never a plain flag value (it would show in `ps`): give a file with
`--token-file`, or set SEGSEARCH_TOKEN. The same goes for the client commands.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from segsearch.errors import SegsearchError
from segsearch.service.config import DEFAULT_PORT, BatchConfig, MiB, RouterConfig, ServerConfig, ServiceLimits

TOKEN_ENV = "SEGSEARCH_TOKEN"
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
CLIENT_TIMEOUT = 60.0  # seconds: the CLI waits longer than the library client (a first region query loads)


def _pair(text: str, count: int, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def _box(text: str) -> tuple[int, ...]:
    return _pair(text, 4, "x0,y0,x1,y1 (end-exclusive pixels)")


def _point(text: str) -> tuple[int, ...]:
    return _pair(text, 2, "x,y (pixels)")


class _RefuseInlineToken(argparse.Action):
    """`--token VALUE` would put the secret in `ps` and shell history, and argparse would expand
    it to `--token-file VALUE` and echo the secret in "cannot read the token file": refuse it
    by name without repeating the value."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"never pass a token on the command line (it shows in `ps`): put it in a file and "
                     f"give --token-file FILE, or set ${TOKEN_ENV}")


def _add_token_flags(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--token-file", help=help_text)
    p.add_argument("--token", action=_RefuseInlineToken)


def _read_token(path: str | None) -> str | None:
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as error:
            raise SegsearchError(f"cannot read the token file {path}: {error.strerror}") from None
        if not token:
            raise SegsearchError(f"the token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _picture_path(path: str | None, flag: str) -> str | None:
    """Check an output picture path before any work: a file in an existing folder, with an
    extension Pillow can write."""
    if path is None:
        return None
    from PIL import Image

    target = Path(path)
    if target.is_dir():
        raise SegsearchError(f"{flag} {path} is a folder; give a file name such as {target / 'picture.png'}")
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if target.suffix.lower() not in writable:
        raise SegsearchError(f"{flag} {path}: give a picture file name ending in .png (or .jpg, .webp, ...)")
    if not target.parent.is_dir():
        raise SegsearchError(f"{flag} {path}: the folder {target.parent} does not exist")
    return path


def _read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SegsearchError(f"cannot read {what} {path}: {error.strerror}") from None


# ---- serve -------------------------------------------------------------------------------

def _add_frontend_flags(p: argparse.ArgumentParser, d) -> None:
    """The flags `serve` and `route` share, with defaults from their config `d`."""
    p.add_argument("--host", default=d.host, help="address to bind (default: %(default)s; "
                   "0.0.0.0 exposes the service to the network)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port, 0 = any free (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="Prometheus /metrics port, 0 = any free (default: %(default)s)")
    p.add_argument("--metrics-host", default=d.metrics_host,
                   help="address of the /metrics endpoint; 0.0.0.0 lets a Prometheus on another machine "
                        "scrape it (default: %(default)s, whatever --host is)")
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                   help="concurrent requests before RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--max-concurrent-writes", type=int, default=d.max_concurrent_writes,
                   help="concurrent IndexImages/DeleteImages calls, on slots apart from the searches' "
                        "(default: %(default)s)")
    p.add_argument("--max-message-mib", type=int, default=d.max_message_bytes // MiB,
                   help="gRPC message limit (default: %(default)s)")
    p.add_argument("--grace", type=float, default=d.grace_seconds,
                   help="seconds in-flight calls get on SIGTERM (default: %(default)s)")


def _frontend_options(args) -> dict:
    return dict(host=args.host, port=args.port, metrics_host=args.metrics_host, max_concurrent=args.max_concurrent,
                max_concurrent_writes=args.max_concurrent_writes,
                max_message_bytes=args.max_message_mib * MiB, token=_read_token(args.token_file),
                grace_seconds=args.grace)


def add_serve_parser(subparsers) -> None:
    d, limits, batching = ServerConfig(index_dir="", checkpoint=""), ServiceLimits(), BatchConfig()
    p = subparsers.add_parser("serve", help="serve an index over gRPC (search, segment, live updates)",
                              description="Serve INDEX_DIR with the model it was built with: gRPC "
                              "segsearch.v1.SegmentSearch, grpc.health.v1, reflection, and Prometheus "
                              "metrics on their own HTTP port. Stops cleanly on SIGTERM.")
    p.add_argument("index_dir", metavar="INDEX_DIR")
    p.add_argument("--model", metavar="CKPT", help="checkpoint the index was built with (default: the "
                                                  "shipped general model, spml/models/general.pt)")
    _add_frontend_flags(p, d)
    p.add_argument("--no-metrics", action="store_true", help="no metrics endpoint")
    p.add_argument("--max-top-k", type=int, default=limits.max_top_k, help="(default: %(default)s)")
    p.add_argument("--max-pixels", "--max-image-pixels", dest="max_image_pixels", type=int,
                   default=limits.max_image_pixels,
                   help="larger images are refused from their header, before decoding; the indexer's "
                        "flag of the same name (default: %(default)s)")
    p.add_argument("--embedding-cache-mib", type=int, default=limits.embedding_cache_bytes // MiB,
                   help="memory for the embedding maps (mask queries) and region levels (box and point "
                        "queries) of recent query images, so that a second region of the same image skips "
                        "the forward pass and the segmentation; 0 = off (default: %(default)s)")
    p.add_argument("--stream-idle-seconds", type=float, default=limits.stream_idle_seconds,
                   help="an IndexImages stream whose next message takes longer is closed with "
                        "DEADLINE_EXCEEDED (default: %(default)s)")
    p.add_argument("--decode-budget-pixels", type=int, default=limits.decode_budget_pixels,
                   help="pixels decoded at once across requests, bounding their memory; a request "
                        "waits for room, then gets RESOURCE_EXHAUSTED (default: %(default)s)")
    p.add_argument("--max-batch-queries", type=int, default=limits.max_batch_queries,
                   help="most queries in one SearchSimilarBatch call; more is INVALID_ARGUMENT "
                        "(default: %(default)s)")
    p.add_argument("--search-effort", type=int, default=limits.search_effort,
                   help="HNSW efSearch / IVF nprobe of a request that sets no search_effort; 0 = the "
                        "index's own setting (default: %(default)s)")
    p.add_argument("--max-search-effort", type=int, default=limits.max_search_effort,
                   help="largest search_effort a request may ask for; more is INVALID_ARGUMENT "
                        "(default: %(default)s)")
    _add_token_flags(p, f"require this bearer token (else ${TOKEN_ENV}, if set)")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--read-only", action="store_true",
                   help="open the index read-only (IndexImages/DeleteImages refused; follows another writer)")
    p.add_argument("--device", default=d.device, help="torch device of the model (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=d.save_every,
                   help="write the FAISS snapshot after every N write commits (default: when 5%% of the "
                        "index or 50k vectors changed, or after 5 min, and at shutdown; LMDB is always "
                        "committed before a write is acknowledged)")
    p.add_argument("--faiss-threads", type=int, default=d.faiss_threads,
                   help="OpenMP threads of one FAISS search; concurrent requests already use the cores "
                        "(default: %(default)s)")
    p.add_argument("--image-uris", choices=("relative", "absolute", "none"), default=d.image_uris,
                   help="what clients see of image paths: the path under the corpus root, the server's "
                        "absolute path, or nothing (default: %(default)s)")
    p.add_argument("--batch-max", type=int, default=0,
                   help="batch up to this many concurrent model calls; 1 = no batching; 0 = auto: "
                        f"{batching.max_batch} on CUDA, off on CPU where it measured no gain (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=batching.max_wait_ms,
                   help="how long a model call waits for others to batch with (default: %(default)s)")
    p.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    from segsearch.service.server import serve
    from segsearch.spml.checkpoint import resolve_checkpoint

    config = ServerConfig(
        index_dir=args.index_dir, checkpoint=str(resolve_checkpoint(args.model)), **_frontend_options(args),
        metrics_port=None if args.no_metrics else args.metrics_port,
        limits=ServiceLimits(max_top_k=args.max_top_k, max_image_pixels=args.max_image_pixels,
                             decode_budget_pixels=args.decode_budget_pixels,
                             stream_idle_seconds=args.stream_idle_seconds,
                             embedding_cache_bytes=args.embedding_cache_mib * MiB,
                             max_batch_queries=args.max_batch_queries, search_effort=args.search_effort,
                             max_search_effort=args.max_search_effort),
        tls_cert=args.tls_cert, tls_key=args.tls_key, read_only=args.read_only, device=args.device,
        image_uris=args.image_uris, save_every=args.save_every, faiss_threads=args.faiss_threads,
        batching=BatchConfig(args.batch_max, args.batch_wait_ms) if args.batch_max else None,
    )
    return serve(config, on_ready=lambda line: print(line, flush=True))


# ---- route -------------------------------------------------------------------------------

def add_route_parser(subparsers) -> None:
    d = RouterConfig()
    p = subparsers.add_parser("route", help="serve several `segsearch serve` backends (shards) as one",
                              description="A read-only gRPC segsearch.v1.SegmentSearch (+ health, reflection) "
                              "that fans each search out to every backend (each a `segsearch serve` of some "
                              "shards of one layout) and merges the hits by score. The backends must serve "
                              "one model version. IndexImages and DeleteImages by image id answer FAILED_PRECONDITION; "
                              "DeleteImages by segment id goes to the backend holding each.")
    p.add_argument("--backend", action="append", required=True, metavar="HOST:PORT",
                   help="a backend server (repeat for each)")
    _add_frontend_flags(p, d)
    _add_token_flags(p, f"require this bearer token and send it to the backends (else ${TOKEN_ENV}, if set)")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout,
                   help="seconds to wait for every backend at start (default: %(default)s)")
    p.add_argument("--health-interval", type=float, default=d.health_interval,
                   help="seconds between checks of the backends' health; the router is SERVING only "
                        "while every backend is (default: %(default)s)")
    p.set_defaults(handler=run_route)


def run_route(args) -> int:
    from segsearch.service.router_server import route

    config = RouterConfig(backends=list(args.backend), **_frontend_options(args), metrics_port=args.metrics_port,
                          connect_timeout=args.connect_timeout, health_interval=args.health_interval)
    return route(config, on_ready=lambda line: print(line, flush=True))


# ---- client commands ---------------------------------------------------------------------

def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER, help="host:port (default: %(default)s)")
    _add_token_flags(p, f"bearer token file (else ${TOKEN_ENV}, if set)")
    p.add_argument("--tls-ca", help="PEM root certificate: connect with TLS")
    p.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT, help="deadline in seconds (default: %(default)s)")


def _client(args):
    from segsearch.service.client import SegsearchClient

    return SegsearchClient(args.server, token=_read_token(args.token_file), root_cert=args.tls_ca,
                           timeout=args.timeout)


def add_query_parser(subparsers) -> None:
    p = subparsers.add_parser("query", help="find indexed segments like a region of an image",
                              description="Ask a running `segsearch serve` for the segments most like "
                              "a region of IMAGE (a box, a point, or a mask), or like a stored segment.")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="query image (PNG, JPEG, WebP)")
    region = p.add_mutually_exclusive_group(required=True)
    region.add_argument("--box", type=_box, metavar="x0,y0,x1,y1", help="end-exclusive pixel box")
    region.add_argument("--point", type=_point, metavar="x,y", help="the over-segment containing it")
    region.add_argument("--mask", metavar="MASK.png", help="PNG of the image's size, non-zero inside")
    region.add_argument("--segment-id", type=int, help="a stored segment (no IMAGE needed)")
    p.add_argument("--top-k", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--labels", default="", help="comma-separated labels to keep")
    p.add_argument("--exclude-image", action="append", default=[], help="image id to leave out (repeatable)")
    p.add_argument("--min-area", type=float, default=0.0, help="minimum area fraction of a hit")
    p.add_argument("--min-score", type=float, default=0.0, help="drop hits scoring below it")
    p.add_argument("--search-effort", type=int, default=0,
                   help="HNSW efSearch / IVF nprobe of this search; 0 = the server's default")
    p.add_argument("--level", choices=("default", "fine", "region", "any"), default="default",
                   help="which segments to return: regions of the images' hierarchies (the default where "
                        "the index holds them), fine segments, or any (never a region with a piece of it)")
    p.add_argument("--out", help="write a contact sheet PNG: the query, then the hits")
    p.add_argument("--images-root", metavar="DIR",
                   help="with --out: the corpus folder, to draw hits whose image_uri is relative to it")
    p.add_argument("--json", action="store_true", help="print hits as JSON lines")
    _add_client_flags(p)
    p.set_defaults(handler=run_query)


def run_query(args) -> int:
    import grpc

    if args.segment_id is None and not args.image:
        raise SegsearchError("give IMAGE with --box, --point or --mask (or use --segment-id)")
    if args.segment_id is not None and args.image:
        raise SegsearchError(f"--segment-id searches with a stored segment; IMAGE ({args.image}) would be ignored, "
                             "so leave it out (or search by a region of it with --box, --point or --mask)")
    _picture_path(args.out, "--out")
    options = dict(top_k=args.top_k, labels=[v for v in args.labels.split(",") if v],
                   exclude_image_ids=args.exclude_image, min_area_fraction=args.min_area,
                   min_score=args.min_score, include_masks=bool(args.out), search_effort=args.search_effort,
                   level=args.level)
    image = _read_bytes(args.image, "the image") if args.image else None
    with _client(args) as client:
        try:
            if args.segment_id is not None:
                response = client.search_segment(args.segment_id, **options)
            elif args.box:
                response = client.search_box(image, args.box, **options)
            elif args.point:
                response = client.search_point(image, args.point, **options)
            else:
                response = client.search_mask(image, _read_bytes(args.mask, "the mask"), **options)
        except grpc.RpcError as error:
            raise SegsearchError(f"{error.code().name}: {error.details()}") from None
    print_hits(response.hits, args.json)
    if args.out:
        from segsearch.service.sheets import write_query_sheet

        title = Path(args.image).name if args.image else f"segment {args.segment_id}"
        print(f"contact sheet: {write_query_sheet(image, response, args.out, title, args.images_root)}")
    return 0


def pb_level_name(level: int) -> str:
    from segsearch.service._generated import segment_search_pb2 as pb

    return pb.Level.Name(level).removeprefix("LEVEL_").lower()


def print_hits(hits, as_json: bool = False) -> None:
    """Hits as a table (or JSON lines), as `segsearch query` prints them."""
    if as_json:
        for hit in hits:
            print(json.dumps({"segment_id": hit.segment_id, "score": round(hit.score, 5), "image_id": hit.image_id,
                              "label": hit.label, "label_score": round(hit.label_score, 4),
                              "area_fraction": round(hit.area_fraction, 5),
                              "level": pb_level_name(hit.level), "parent_segment_id": hit.parent_segment_id,
                              "box": [hit.box.x0, hit.box.y0, hit.box.x1, hit.box.y1], "image_uri": hit.image_uri}))
        return
    print(f"{'rank':>4}  {'score':>6}  {'segment':>8}  {'label (score)':<16} image")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:>4}  {hit.score:6.3f}  {hit.segment_id:>8}  {label_text(hit.label, hit.label_score):<16} "
              f"{hit.image_id}")


def label_text(label: str, label_score: float) -> str:
    """`label (score)`, or "(no label)" where the label bank does not cover the segment (the
    service then sends an empty label and label_score 0)."""
    return f"{label} ({label_score:.2f})" if label else "(no label)"


def add_segment_parser(subparsers) -> None:
    p = subparsers.add_parser("segment", help="segment an image with a running server",
                              description="Over-segment IMAGE and label each segment by k-NN vote "
                              "(through a running `segsearch serve`).")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--out", help="write an overlay PNG: boundaries | labels, with a legend")
    p.add_argument("--num-segments", type=int, default=0, help="this many regions, a cut of the region hierarchy (0 = the server's region level)")
    p.add_argument("--maps", help="also write the 16-bit segment map and 8-bit label map as PREFIX_segments.png "
                   "and PREFIX_labels.png (values for programs), and PREFIX_segments_colour.png and "
                   "PREFIX_labels_colour.png (the same maps in colours, for a viewer)")
    _add_client_flags(p)
    p.set_defaults(handler=run_segment)


def run_segment(args) -> int:
    import grpc

    _picture_path(args.out, "--out")
    if args.maps is not None:
        _picture_path(f"{args.maps}_segments.png", "--maps")
    image = _read_bytes(args.image, "the image")
    with _client(args) as client:
        try:
            response = client.segment(image, args.num_segments)
        except grpc.RpcError as error:
            raise SegsearchError(f"{error.code().name}: {error.details()}") from None
    print(f"{len(response.segments)} segments ({response.width}x{response.height})")
    for info in response.segments:
        print(f"  {info.index:>3}  {label_text(info.label, info.label_score):<22} area {info.area_fraction:.3f}")
    if args.maps:
        from segsearch.service.sheets import write_viewable_maps

        Path(f"{args.maps}_segments.png").write_bytes(response.segment_map_png)
        Path(f"{args.maps}_labels.png").write_bytes(response.label_map_png)
        write_viewable_maps(response, args.maps)
    if args.out:
        from segsearch.service.sheets import write_segment_overlay

        print(f"overlay: {write_segment_overlay(image, response, args.out)}")
    return 0


# ---- load --------------------------------------------------------------------------------

def _id_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        bounds = int(first), int(last or first)
    except ValueError:
        bounds = (0, -1)
    if not 0 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST segment ids, got {text!r}")
    return bounds


def add_load_parser(subparsers) -> None:
    from segsearch.service.loadgen import LoadConfig

    d = LoadConfig()
    p = subparsers.add_parser("load", help="drive a running server with bounded SearchSimilar load",
                              description="Send SearchSimilar calls to a running `segsearch serve` (plaintext, "
                              "no token): closed loop (--clients callers) or open loop (--rate queries/s, at "
                              "most --clients in flight; requests that cannot start on time are counted as "
                              "missed), until --requests or --seconds. Prints achieved queries/s, latency "
                              "percentiles of the OK answers and the status codes.")
    p.add_argument("--ids", type=_id_range, required=True, metavar="FIRST-LAST",
                   help="stored segment ids to search by, drawn uniformly (e.g. 1-5000)")
    p.add_argument("--region-images", nargs="*", default=[], metavar="IMAGE",
                   help="query images for searches by region (a box a third of the image)")
    p.add_argument("--region-fraction", type=float, default=0.0, help="share of searches by region")
    p.add_argument("--mode", choices=("closed", "open"), default=d.mode, help="(default: %(default)s)")
    p.add_argument("--clients", type=int, default=d.clients,
                   help="closed: callers; open: most calls in flight (default: %(default)s)")
    p.add_argument("--rate", type=float, default=d.rate, help="open loop: offered queries/s (default: %(default)s)")
    p.add_argument("--arrivals", choices=("poisson", "fixed"), default=d.arrivals, help="(default: %(default)s)")
    p.add_argument("--requests", type=int, default=d.requests, help="stop after this many (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=d.seconds, help="... or after this long (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--probe-health", action="store_true", help="check grpc.health.v1 10 times a second meanwhile")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--server", default=DEFAULT_SERVER, help="host:port (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="deadline of each call (default: %(default)s)")
    p.set_defaults(handler=run_load_command)


def run_load_command(args) -> int:
    import contextlib

    from PIL import Image

    from segsearch.service.loadgen import HealthProbe, LoadConfig, RequestMix, run_load

    images = []
    for path in args.region_images:
        data = _read_bytes(path, "the query image")
        with Image.open(io.BytesIO(data)) as image:
            images.append((data, *image.size))
    try:
        mix = RequestMix(np.arange(args.ids[0], args.ids[1] + 1), images, args.region_fraction, args.top_k)
        config = LoadConfig(mode=args.mode, clients=args.clients, rate=args.rate, arrivals=args.arrivals,
                            requests=args.requests, seconds=args.seconds, timeout=args.timeout)
    except ValueError as error:
        raise SegsearchError(str(error)) from None
    with HealthProbe(args.server) if args.probe_health else contextlib.nullcontext() as probe:
        summary = run_load(args.server, mix, config).summary()
    if probe is not None:
        summary["health"] = {"checks": probe.result.count, "outcomes": dict(probe.result.outcomes),
                             "p99_ms": round(probe.result.percentile(99), 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>16}: {value}")
    if summary["sent"] and not summary["codes"].get("OK"):
        print(f"segsearch load: error: none of the {summary['sent']} calls succeeded ({summary['codes']}); "
              f"is a server listening at {args.server}?", file=sys.stderr)
        return 1
    return 0


def add_service_parsers(subparsers) -> None:
    add_serve_parser(subparsers)
    add_route_parser(subparsers)
    add_query_parser(subparsers)
    add_segment_parser(subparsers)
    add_load_parser(subparsers)


if __name__ == "__main__":
    from segsearch.cli import main

    sys.exit(main())
