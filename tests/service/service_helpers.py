"""Helpers of the service tests (images, index copies, servers, metric parsing)."""
from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

from segsearch.service.client import SegsearchClient
from segsearch.service.pngs import encode_image_png
from segsearch.service.server import SegsearchServer
from segsearch.service.config import ServerConfig
from segsearch.testing.tiny_index import PHOTO, mosaic_images, photo  # noqa: F401  (the tests' names)

png_bytes = encode_image_png


def copy_index(template: Path, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("index") / "index"
    shutil.copytree(template, target, ignore=shutil.ignore_patterns("writer.lock"))
    return target


class RunningServer:
    """A started and loaded SegsearchServer with a client; `stop()` drains it."""

    def __init__(self, server: SegsearchServer, token: str | None = None):
        self.server = server
        self.address = server.address
        self.client = SegsearchClient(self.address, token=token, timeout=30)

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def stop(self) -> None:
        self.client.close()
        self.server.stop(grace=2)


def start_server(index_dir: Path, checkpoint: Path, **overrides) -> RunningServer:
    settings = {"port": 0, "metrics_port": 0, **overrides}
    config = ServerConfig(index_dir=str(index_dir), checkpoint=str(checkpoint), **settings)
    server = SegsearchServer(config)
    server.start_loaded()
    return RunningServer(server, token=overrides.get("token"))


def metric_value(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()) and len(found) == len(labels):
            return float(value)
    return 0.0
