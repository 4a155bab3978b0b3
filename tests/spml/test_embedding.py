import pytest
import torch

from segsearch.spml.embedding import EmbeddingNet, ModelConfig
from segsearch.spml.checkpoint import load_weights, model_version, trainable_state_dict


def test_embeddings_are_unit_norm_at_stride_4():
    torch.manual_seed(0)
    model = EmbeddingNet(ModelConfig(backbone="small", pretrained=False, embedding_dim=16))
    images = torch.rand(2, 3, 37, 50) * 255
    embeddings = model(images)
    assert embeddings.shape == (2, 16, 10, 13)
    norms = embeddings.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_cached_features_path_equals_full_forward():
    torch.manual_seed(0)
    model = EmbeddingNet(ModelConfig(backbone="small", pretrained=False)).eval()
    images = torch.rand(1, 3, 32, 32) * 255
    assert torch.allclose(model(images), model.embed_features(model.features(images)), atol=1e-6)


def test_classifier_only_for_ce_models():
    config = ModelConfig(backbone="small", pretrained=False, num_classes=5)
    model = EmbeddingNet(config)
    raw = model.raw_embeddings(model.features(torch.rand(1, 3, 16, 16) * 255))
    assert model.logits(raw).shape == (1, 5, 4, 4)


def test_colour_code_holds_its_share_of_every_pixel_embedding():
    torch.manual_seed(0)
    config = ModelConfig(backbone="small", pretrained=False, embedding_dim=8, colour_bins=3, colour_weight=0.3)
    model = EmbeddingNet(config).eval()
    images = torch.rand(2, 3, 20, 24) * 255
    embeddings = model(images)
    assert config.output_dim == 8 + 27 and embeddings.shape == (2, 35, 5, 6)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2, 5, 6), atol=1e-5)
    colour_share = embeddings[:, 8:].pow(2).sum(dim=1)
    assert torch.allclose(colour_share, torch.full_like(colour_share, 0.3), atol=1e-5)
    assert torch.allclose(model.embed_features(model.features(images)), embeddings, atol=1e-6)


def test_colour_code_makes_same_texture_in_other_colours_distinct():
    """Two images that differ only by hue: the head alone (untrained) may not tell them apart
    well, the colour part must: their mean embeddings' colour parts are far apart."""
    config = ModelConfig(backbone="small", pretrained=False, embedding_dim=8, colour_bins=4, colour_weight=0.5)
    model = EmbeddingNet(config).eval()
    pattern = torch.rand(1, 1, 32, 32)
    red = torch.cat([pattern * 200 + 40, pattern * 30, pattern * 30], dim=1)
    green = torch.cat([pattern * 30, pattern * 200 + 40, pattern * 30], dim=1)
    with torch.no_grad():
        means = [model(image)[0].mean(dim=(1, 2)) for image in (red, green)]
    cosine = torch.nn.functional.cosine_similarity
    colour, head = float(cosine(means[0][8:], means[1][8:], dim=0)), float(cosine(means[0][:8], means[1][:8], dim=0))
    assert colour < 0.5 and colour < head


def test_block_norm_gives_every_block_unit_norm():
    model = EmbeddingNet(ModelConfig(backbone="small", pretrained=False, feature_blocks=(1, 2), block_norm=True))
    features = model.features(torch.rand(1, 3, 16, 16) * 255)
    widths = [model.backbone.block_channels[b - 1] for b in (1, 2)]
    first, second = features[:, : widths[0]], features[:, widths[0]: widths[0] + widths[1]]
    for block in (first, second):
        assert torch.allclose(block.norm(dim=1), torch.ones(1, 4, 4), atol=1e-5)


def test_colour_settings_are_checked():
    with pytest.raises(ValueError, match="colour_weight"):
        ModelConfig(backbone="small", pretrained=False, colour_bins=4, colour_weight=0.0)
    with pytest.raises(ValueError, match="cross-entropy"):
        ModelConfig(backbone="small", pretrained=False, colour_bins=4, colour_weight=0.5, num_classes=3)


def test_fixed_texture_and_colour_parts_hold_their_shares_in_order():
    torch.manual_seed(0)
    config = ModelConfig(backbone="small", pretrained=False, embedding_dim=8, feature_blocks=(2, 3),
                         texture_blocks=(2,), texture_weight=0.25, colour_bins=2, colour_weight=0.35)
    assert config.texture_dim == 32 and config.output_dim == 8 + 32 + 8
    assert config.head_weight == pytest.approx(0.4)
    model = EmbeddingNet(config).eval()
    with torch.no_grad():
        embeddings = model(torch.rand(1, 3, 16, 16) * 255)
    assert embeddings.shape == (1, 48, 4, 4)
    shares = [part.pow(2).sum(dim=1) for part in (embeddings[:, :8], embeddings[:, 8:40], embeddings[:, 40:])]
    for share, expected in zip(shares, (0.4, 0.25, 0.35), strict=True):
        assert torch.allclose(share, torch.full_like(share, expected), atol=1e-5)
    with pytest.raises(ValueError, match="below 1"):
        ModelConfig(backbone="small", pretrained=False, texture_blocks=(2,), texture_weight=0.6,
                    colour_bins=2, colour_weight=0.4)


def test_a_residual_head_starts_as_the_pca_projection_and_is_stored():
    config = ModelConfig(backbone="small", pretrained=False, feature_blocks=(1, 2), embedding_dim=4, hidden_dim=16,
                         head_type="residual")
    net = EmbeddingNet(config)
    # pixels with most energy along the first channels: the top directions are e0..e3
    scales = torch.full((net.head_channels,), 0.1)
    scales[:4] = torch.tensor([8.0, 4.0, 2.0, 1.0])
    pixels = torch.randn(4000, net.head_channels, generator=torch.Generator().manual_seed(0)) * scales
    net.head.set_projection(pixels)
    projection = net.head.projection
    assert torch.allclose(projection @ projection.T, torch.eye(4), atol=1e-5)
    assert torch.allclose(projection[:, :4].abs(), torch.eye(4), atol=0.1)
    features = torch.randn(2, net.head_channels, 5, 6)
    expected = torch.einsum("dc,bchw->bdhw", projection, features)
    assert torch.allclose(net.head(features), expected, atol=1e-6)  # the correction starts at zero
    state = trainable_state_dict(net, backbone_frozen=True)
    assert "head.projection" in state
    rebuilt = EmbeddingNet(config)
    load_weights(rebuilt, state)
    assert torch.equal(rebuilt.head.projection, projection)
    assert model_version(config, state) != model_version(ModelConfig.from_dict(
        {**config.to_dict(), "head_type": "mlp"}), state)
