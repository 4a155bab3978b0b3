"""The on-disk cache of training's per-image-set tensors (backbone features, edge maps)."""
import torch

from segsearch.trainer import feature_cache
from segsearch.trainer.feature_cache import cached, key_for


def test_a_second_call_reads_the_stored_tensor_instead_of_computing(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSEARCH_CACHE_DIR", str(tmp_path))
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(2, 5, 1, 1).half()

    key = key_for("features", images, torch.nn.Linear(2, 2).requires_grad_(False), (3, 4))
    first, second = cached(key, compute), cached(key, compute)
    assert len(calls) == 1 and torch.equal(first, second) and second.dtype == torch.float16
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.pt"]


def test_the_key_changes_with_images_weights_and_settings():
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(2, 2)
    base = key_for("features", images, backbone, (3,))
    other_images = images.clone()
    other_images[0, 0, 0, 0] = 1
    assert key_for("features", other_images, backbone, (3,)) != base
    assert key_for("features", images, torch.nn.Linear(2, 2), (3,)) != base  # other weights
    assert key_for("features", images, backbone, (4,)) != base
    assert key_for("edges", images, backbone, (3,)) != base
    assert key_for("features", images, backbone, (3,)) == base


def test_a_damaged_entry_is_recomputed_and_off_means_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSEARCH_CACHE_DIR", str(tmp_path))
    (tmp_path / "k.pt").write_bytes(b"not a tensor")
    assert torch.equal(cached("k", lambda: torch.ones(2)), torch.ones(2))
    assert torch.equal(torch.load(tmp_path / "k.pt"), torch.ones(2))
    monkeypatch.setenv("SEGSEARCH_CACHE_DIR", "off")
    assert feature_cache.cache_dir() is None and torch.equal(cached("k", lambda: torch.zeros(1)), torch.zeros(1))


def test_the_features_key_changes_with_every_setting_that_shapes_the_features():
    """block_norm, texture_blocks and colour_bins change `model.features()` as much as the
    blocks do: a cached tensor made under other settings must not be read back."""
    import dataclasses

    from segsearch.spml.embedding import EmbeddingNet, ModelConfig
    from segsearch.trainer.prepared import features_key

    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    base_config = ModelConfig(backbone="small", pretrained=False, hidden_dim=16, embedding_dim=4)
    torch.manual_seed(0)
    model = EmbeddingNet(base_config)
    base = features_key(images, model)
    for change in (dict(block_norm=True), dict(colour_bins=2, colour_weight=0.5),
                   dict(texture_blocks=(1,), texture_weight=0.5)):
        model.config = dataclasses.replace(base_config, **change)
        assert features_key(images, model) != base, change
    model.config = base_config
    assert features_key(images, model) == base
