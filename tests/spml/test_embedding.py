import torch

from segsearch.spml.embedding import EmbeddingNet, ModelConfig


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
