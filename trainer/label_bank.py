"""Labelled training prototypes for k-NN labelling (SPML's inference-time memory).

Each training image is over-segmented by spherical k-means on the model's embeddings; the
segments are split by the image's weak labels, and every segment that carries a weak label
contributes its prototype and label. The same segments also give the baseline descriptors'
banks, so a baseline and the model are compared on identical regions.
"""
from __future__ import annotations

import torch

from segsearch.spml.checkpoint import LabelBank
from segsearch.spml.embedding import EmbeddingNet
from segsearch.spml.kmeans import KMeansConfig, spherical_kmeans
from segsearch.trainer.descriptors import pixel_descriptors
from segsearch.trainer.prepared import PreparedSet
from segsearch.trainer.sample import IGNORE_INDEX
from segsearch.trainer.training_segments import build_training_segments


@torch.no_grad()
def segment_batch(model: EmbeddingNet, features: torch.Tensor, kmeans: KMeansConfig):
    """features (B, C, h, w) -> (embeddings (B, D, h, w), segment ids (B, h, w))."""
    embeddings = model.embed_features(features.float())
    return embeddings, spherical_kmeans(embeddings, kmeans).segment_ids


@torch.no_grad()
def build_label_banks(
    model: EmbeddingNet,
    prepared: PreparedSet,
    kmeans: KMeansConfig,
    device: torch.device,
    descriptors: tuple[str, ...] = ("model",),
    batch_size: int = 16,
) -> dict[str, LabelBank]:
    model.eval()
    collected = {name: ([], []) for name in descriptors}
    for start in range(0, len(prepared), batch_size):
        index = torch.arange(start, min(start + batch_size, len(prepared)))
        images = prepared.images[index].to(device)
        features = _features(model, prepared, index, images)
        _, segment_ids = segment_batch(model, features, kmeans)
        weak = prepared.weak_labels[index].to(device)
        no_contours = torch.zeros_like(weak)
        for name in descriptors:
            pixels = pixel_descriptors(name, model, images, features)
            segments = build_training_segments(pixels, segment_ids, no_contours, weak)
            labelled = segments.segment_label != IGNORE_INDEX
            collected[name][0].append(segments.prototypes[labelled].cpu())
            collected[name][1].append(segments.segment_label[labelled].cpu())
    return {
        name: LabelBank(torch.cat(protos).float(), torch.cat(labels))
        for name, (protos, labels) in collected.items()
    }


def _features(model, prepared, index, images):
    if prepared.features is not None:
        return prepared.features[index].to(images.device).float()
    return model.features(images.float())


def build_label_bank(model, prepared, config, device) -> LabelBank:
    kmeans = KMeansConfig(grid=tuple(config.inference_grid), iterations=config.kmeans_iterations)
    return build_label_banks(model, prepared, kmeans, device)["model"]
