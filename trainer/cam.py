"""Pixel pseudo-labels from image tags via class activation maps (CAM).

SPML's image-tag setting takes its semantic-annotation relation (C) from CAM pseudo labels.
We train a linear multi-label classifier on globally average-pooled *frozen* backbone
features (GAP is linear, so the classifier applied per pixel is exactly the CAM), then label
each pixel with the image tag whose normalised CAM is highest. Pixels where no tag's CAM
reaches `threshold` become background (when the dataset has one) or stay unlabelled.

Box supervision uses the same classifier: `box_cam_labels` keeps, inside each box, the pixels
where the box class's CAM normalised inside the box reaches 0.5 (SPML's box pseudo labels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from segsearch.trainer.sample import IGNORE_INDEX
from segsearch.trainer.weak_labels import Box


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


def fit_tag_classifier(
    features: torch.Tensor,
    tags: torch.Tensor,
    background_class: int | None,
    valid: torch.Tensor | None = None,
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 32,
) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """Train the CAM classifier on image tags without the background class.

    features (N, C, h, w); tags (N, K) bool; valid (N, h, w) bool, False on padding (None:
    no padding). Padding is left out of the pooled features. Returns (classifier,
    foreground tags (N, K) bool, valid (N, h, w) bool)."""
    if valid is None:
        valid = torch.ones(features.shape[0], *features.shape[2:], dtype=torch.bool)
    pooled = torch.cat([
        masked_mean_pool(features[i : i + batch_size].float(), valid[i : i + batch_size])
        for i in range(0, len(features), batch_size)
    ])
    foreground = tags.clone()
    if background_class is not None:
        foreground[:, background_class] = False
    return train_tag_classifier(pooled, foreground, steps, seed), foreground, valid


def cam_pseudo_labels(
    features: torch.Tensor,
    tags: torch.Tensor,
    background_class: int | None,
    threshold: float = 0.2,
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 32,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """features (N, C, h, w) frozen backbone features; tags (N, K) bool -> labels (N, h, w) long.

    valid (N, h, w) bool, False on padding: padding is left out of the pooled features the
    classifier trains on and is never labelled (it would otherwise become background)."""
    classifier, foreground, valid = fit_tag_classifier(features, tags, background_class, valid, steps,
                                                       seed, batch_size)
    labels = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size].float()
            cams = class_activation_maps(chunk, classifier)
            inside = valid[start : start + batch_size]
            cams = cams * inside.unsqueeze(1)  # padding must not set a CAM's peak
            chunk_labels = _labels_from_cams(cams, foreground[start : start + batch_size],
                                             background_class, threshold)
            labels.append(chunk_labels.masked_fill(~inside, IGNORE_INDEX))
    return torch.cat(labels)


def box_cam_labels(
    features: torch.Tensor,
    tags: torch.Tensor,
    boxes: list[list[Box]],
    background_class: int | None,
    stride: int,
    threshold: float = 0.5,
    steps: int = 300,
    seed: int = 0,
    valid: torch.Tensor | None = None,
    window: int = 1,
) -> torch.Tensor:
    """Box supervision as SPML uses it: inside each box, only pixels where the box class's
    CAM, normalised by its maximum *inside that box*, reaches `threshold` (SPML: 0.5) take the
    box's class; the rest of the box stays unlabelled (it still feeds V, O and A). Outside
    every box: `background_class` (or unlabelled when None).

    features (N, C, h, w) at `stride` pixels per cell; tags (N, K) bool; boxes: per image,
    `(class, x0, y0, x1, y1)` end-exclusive in image pixels; valid (N, h, w) bool.
    window: the CAM is averaged over `window x window` cells first (1 = not at all), see
    `smooth_cams`. Returns labels (N, h, w) long, IGNORE_INDEX where unlabelled and on padding.
    Why: painting the whole box labels everything in it with its class, background included;
    with boxes tiling an image (the mosaic) partial CE on such labels is nearly full
    supervision, wrong exactly where boxes overlap.
    """
    classifier, _, valid = fit_tag_classifier(features, tags, background_class, valid, steps, seed)
    outside = IGNORE_INDEX if background_class is None else background_class
    labels = torch.full(valid.shape, outside, dtype=torch.long)
    with torch.no_grad():
        for index, image_boxes in enumerate(boxes):
            cams = class_activation_maps(features[index : index + 1].float(), classifier)
            cams = smooth_cams(cams * valid[index : index + 1].unsqueeze(1), window)[0]
            labels[index] = _label_boxes(labels[index], cams, image_boxes, stride, threshold)
    return labels.masked_fill(~valid, IGNORE_INDEX)


def smooth_cams(cams: torch.Tensor, window: int) -> torch.Tensor:
    """(n, K, h, w) CAMs averaged over `window x window` cells (same size out; 1 = as is).

    Why: SPML's CAMs come from a classification network at stride 8-32, so they are smooth
    over tens of pixels. Ours is a linear map on a stride-4 hypercolumn and is spiky: on the
    mosaic only ~5% of a box's cells reach half the in-box peak (box-CAM coverage 3.9%).
    Averaging over 5x5 cells (20 px) makes it as coarse as a stride-16-32 CAM: 90.8% accurate
    at 40.1% coverage (bench/cam_quality.py; painted boxes: 75.7% at 100%)."""
    if window <= 1:
        return cams
    return F.avg_pool2d(cams, window, stride=1, padding=window // 2, count_include_pad=False)


def _label_boxes(labels: torch.Tensor, cams: torch.Tensor, boxes: list[Box], stride: int,
                 threshold: float) -> torch.Tensor:
    """labels (h, w), cams (K, h, w) of one image -> labels with its boxes applied.

    Every cell a box overlaps starts unlabelled; then boxes from the largest to the smallest
    (so a small box inside a big one has the last word, as when painting) label the cells
    whose in-box normalised CAM of their class reaches `threshold`."""
    labels = labels.clone()
    windows = [(c, _cells(y0, y1, stride), _cells(x0, x1, stride)) for c, x0, y0, x1, y1 in boxes]
    for _, rows, cols in windows:
        labels[rows, cols] = IGNORE_INDEX
    order = sorted(range(len(boxes)), key=lambda i: -(boxes[i][3] - boxes[i][1]) * (boxes[i][4] - boxes[i][2]))
    for i in order:
        class_index, rows, cols = windows[i]
        cam = cams[class_index, rows, cols]
        peak = float(cam.max()) if cam.numel() else 0.0
        if peak <= 0:
            continue  # no evidence for the class anywhere in its box: leave it unlabelled
        window = labels[rows, cols]
        window[cam / peak >= threshold] = class_index
        labels[rows, cols] = window
    return labels


def _cells(start: int, stop: int, stride: int) -> slice:
    """Cells of a stride-`stride` grid that overlap pixels [start, stop)."""
    return slice(start // stride, (stop - 1) // stride + 1)


def class_activation_maps(features: torch.Tensor, classifier: torch.nn.Linear) -> torch.Tensor:
    """(n, C, h, w) features -> (n, K, h, w) CAMs, `relu(w_k . f + b_k)` per pixel.

    The bias belongs inside the ReLU: the classifier's logit for a pixel is `w . f + b`, and
    a CAM is that logit where it is positive. Adding `relu(b)` outside (as this code once did)
    lifts every pixel of a positive-bias class by `b`, so weak pixels pass the threshold with
    that class and a negative bias is dropped altogether.
    """
    logits = torch.einsum("nchw,kc->nkhw", features, classifier.weight)
    return F.relu(logits + classifier.bias.view(1, -1, 1, 1))


def masked_mean_pool(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) features, (n, h, w) bool -> (n, C) mean over the valid pixels (GAP)."""
    weights = valid.unsqueeze(1).to(features.dtype)
    return (features * weights).sum((2, 3)) / weights.sum((2, 3)).clamp(min=1.0)


def _labels_from_cams(cams, tags, background_class, threshold):
    """cams (n, K, h, w) >= 0; only the image's own tags compete; low scores -> bg / ignore."""
    peak = cams.flatten(2).max(dim=2).values.clamp(min=1e-6)
    normalised = (cams / peak[:, :, None, None]).masked_fill(~tags[:, :, None, None], -1.0)
    score, label = normalised.max(dim=1)
    fallback = IGNORE_INDEX if background_class is None else background_class
    return label.masked_fill(score < threshold, fallback)
