"""Does the service's dynamic batcher pay? Box queries through a real server, batching on vs off.

For each concurrency level, N client threads send `SearchSimilar` box queries (each one
embeds its whole image: the model is the cost) to a server started with `--batch-max 1`
(every request runs its own forward pass, concurrently) and one with `--batch-max B`
(concurrent forward passes become one batched pass). Same model, same index, same images,
same machine, measured in one run; reported as queries/s, p50 and p99 latency, and the
batched/unbatched throughput ratio.

The model is an untrained network of the chosen backbone (weights do not change the cost);
the index is a few mosaic images indexed by the indexer's pipeline.

    python bench/service_batching.py --backbone small --embed-size 320 --clients 1 4 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from segsearch.indexer.pipeline import IndexConfig, index_corpus
from segsearch.spml.segmenter import SegmenterConfig
from segsearch.service.config import BatchConfig
from segsearch.service.client import SegsearchClient
from segsearch.service.pngs import encode_image_png
from segsearch.service.server import SegsearchServer
from segsearch.service.config import ServerConfig
from segsearch.spml.checkpoint import Checkpoint, LabelBank, save_checkpoint
from segsearch.spml.embedding import EmbeddingNet, ModelConfig
from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic


def make_checkpoint(path: Path, backbone: str) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(backbone=backbone, pretrained=False, class_names=["a", "b", "c"])
    model = EmbeddingNet(config)
    bank = LabelBank(torch.nn.functional.normalize(torch.randn(30, config.embedding_dim), dim=1),
                     torch.arange(30) % 3)
    save_checkpoint(Checkpoint(config, model.state_dict(), bank), path)
    return path


def make_images(folder: Path, count: int, size: int) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    mosaic = TextureMosaic(MosaicConfig(size=size, num_images=count, seed=5, split="test"))
    encoded = [encode_image_png(mosaic[number].image) for number in range(count)]
    for number, data in enumerate(encoded):
        (folder / f"m{number}.png").write_bytes(data)
    return encoded


def run_load(address: str, images: list[bytes], clients: int, per_client: int, size: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(index: int) -> None:
        client = SegsearchClient(address, timeout=120)
        client.info()  # connect before the clock starts
        rng = np.random.default_rng(index)
        barrier.wait()
        mine = []
        for _ in range(per_client):
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            started = time.perf_counter()
            client.search_box(images[int(rng.integers(len(images)))], (x0, y0, x0 + size // 3, y0 + size // 3), top_k=10)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"qps": len(ordered) / elapsed, "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="small", choices=("small", "vgg16"))
    parser.add_argument("--embed-size", type=int, default=320)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=64, help="queries per concurrency level")
    parser.add_argument("--batch-max", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as raw:
        root = Path(raw)
        checkpoint = make_checkpoint(root / "model.ckpt", args.backbone)
        images = make_images(root / "corpus", 8, args.image_size)
        index_corpus(root / "corpus", checkpoint, root / "index",
                     IndexConfig(progress=False, segmenter=SegmenterConfig(embed_size=args.embed_size)))
        rows = []
        for batch_max in (1, args.batch_max):
            server = SegsearchServer(ServerConfig(
                index_dir=str(root / "index"), checkpoint=str(checkpoint), port=0, metrics_port=None,
                max_concurrent=max(args.clients) + 2, batching=BatchConfig(max_batch=batch_max)))
            server.start()
            server.load()
            try:
                run_load(server.address, images, 1, 4, args.image_size)  # warm-up
                for clients in args.clients:
                    per_client = max(1, args.requests // clients)
                    result = run_load(server.address, images, clients, per_client, args.image_size)
                    rows.append({"batch_max": batch_max, "clients": clients, **result})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                server.stop(grace=1)
    print(f"\nbox queries, {args.backbone} backbone, {args.embed_size}px model input, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| clients | unbatched q/s | p50 / p99 ms | batched q/s | p50 / p99 ms | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for clients in args.clients:
        off = next(r for r in rows if r["clients"] == clients and r["batch_max"] == 1)
        on = next(r for r in rows if r["clients"] == clients and r["batch_max"] == args.batch_max)
        print(f"| {clients} | {off['qps']:.1f} | {off['p50_ms']:.0f} / {off['p99_ms']:.0f} | {on['qps']:.1f} | "
              f"{on['p50_ms']:.0f} / {on['p99_ms']:.0f} | {on['qps'] / off['qps']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
