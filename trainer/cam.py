"""Pixel pseudo-labels from image tags via class activation maps (CAM).

SPML's image-tag setting takes its semantic-annotation relation (C) from CAM pseudo labels.
We train a linear multi-label classifier on globally average-pooled *frozen* backbone
features (GAP is linear, so the classifier applied per pixel is exactly the CAM), then label
each pixel with the image tag whose normalised CAM is highest. Pixels where no tag's CAM
reaches `threshold` become background (when the dataset has one) or stay unlabelled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segsearch.trainer.sample import IGNORE_INDEX


def train_tag_classifier(
    pooled: torch.Tensor, tags: torch.Tensor, steps: int = 300, seed: int = 0
) -> torch.nn.Linear:
    """pooled (N, C) GAP features, tags (N, K) bool -> a Linear(C, K) multi-label classifier."""
    generator = torch.Generator().manual_seed(seed)
    classifier = torch.nn.Linear(pooled.shape[1], tags.shape[1])
    with torch.no_grad():
        classifier.weight.normal_(0, 0.01, generator=generator)
        classifier.bias.zero_()
    mean, std = pooled.mean(0), pooled.std(0) + 1e-6
    inputs = (pooled - mean) / std
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(classifier(inputs), tags.float())
        loss.backward()
        optimizer.step()
    # fold the standardisation into the layer so it applies to raw features
    with torch.no_grad():
        classifier.weight.div_(std)
        classifier.bias.sub_((classifier.weight * mean).sum(1))
    return classifier


def cam_pseudo_labels(
    features: torch.Tensor,
    tags: torch.Tensor,
    background_class: int | None,
    threshold: float = 0.2,
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 32,
) -> torch.Tensor:
    """features (N, C, h, w) frozen backbone features; tags (N, K) bool -> labels (N, h, w) long."""
    pooled = torch.cat(
        [features[i : i + batch_size].float().mean((2, 3)) for i in range(0, len(features), batch_size)]
    )
    foreground = tags.clone()
    if background_class is not None:
        foreground[:, background_class] = False
    classifier = train_tag_classifier(pooled, foreground, steps, seed)
    labels = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size].float()
            cams = F.relu(torch.einsum("nchw,kc->nkhw", chunk, classifier.weight))
            cams = cams + classifier.bias.view(1, -1, 1, 1).clamp(min=0)
            labels.append(_labels_from_cams(cams, foreground[start : start + batch_size],
                                            background_class, threshold))
    return torch.cat(labels)


def _labels_from_cams(cams, tags, background_class, threshold):
    """cams (n, K, h, w) >= 0; only the image's own tags compete; low scores -> bg / ignore."""
    peak = cams.flatten(2).max(dim=2).values.clamp(min=1e-6)
    normalised = (cams / peak[:, :, None, None]).masked_fill(~tags[:, :, None, None], -1.0)
    score, label = normalised.max(dim=1)
    fallback = IGNORE_INDEX if background_class is None else background_class
    return label.masked_fill(score < threshold, fallback)
