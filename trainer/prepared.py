"""Everything the training loop needs per image, computed once.

Weak labels are fixed per image (annotations do not change between epochs), HED contour
regions depend only on the image, and a frozen backbone's features never change: computing
them once turns each training step into a head forward/backward, which is what makes the
benchmark table fit in half an hour on 2 CPU cores. All per-pixel targets are stored at the
embedding resolution (stride 4).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb2gray
from skimage.filters import sobel
from tqdm import tqdm

from segsearch.spml.embedding import OUTPUT_STRIDE, EmbeddingNet
from segsearch.trainer.feature_cache import cached, key_for
from segsearch.trainer.cam import box_cam_labels, cam_pseudo_labels
from segsearch.trainer.lowlevel import DEFAULT_THRESHOLD, region_map
from segsearch.trainer.sample import IGNORE_INDEX, Sample
from segsearch.trainer.weak_labels import WeakLabelConfig, make_weak_labels, rng_for_image

logger = logging.getLogger(__name__)


@dataclass
class PreparedSet:
    """images (N, 3, H, W) uint8; masks (N, H, W) long; at stride 4 (h = ceil(H/4)):
    weak_labels, dense_labels, contours (N, h, w) long; tags (N, K) bool;
    features (N, C, h, w) float16 or None when the backbone is trained;
    valid (N, h, w) bool, False on padding (None: no padding anywhere).
    views > 1: N = views x images, row v * images + i is view v of image i (trainer/views.py)."""

    images: torch.Tensor
    masks: torch.Tensor
    weak_labels: torch.Tensor
    dense_labels: torch.Tensor
    contours: torch.Tensor
    tags: torch.Tensor
    features: torch.Tensor | None
    image_ids: list[str]
    valid: torch.Tensor | None = None
    views: int = 1

    def valid_mask(self, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """(n, h, w) bool for the images at `index`: True on image content."""
        if self.valid is None:
            return torch.ones_like(self.weak_labels[index], dtype=torch.bool)
        return self.valid[index]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_images(self) -> int:
        """Distinct images (rows / views)."""
        return len(self) // self.views


def prepare_set(
    samples: list[Sample],
    num_classes: int,
    weak_config: WeakLabelConfig,
    model: EmbeddingNet | None,
    edge_source: str = "hed",
    contour_segments_per_image: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    contour_method: str = "grid",
    contour_threshold: float = DEFAULT_THRESHOLD,
) -> PreparedSet:
    """Weak labels, contour regions and (when `model` is given) frozen backbone features.

    Contour regions (relation V) by `contour_method` (`trainer/lowlevel.py`): "hierarchy" =
    at most `contour_segments_per_image` regions of the image's contour hierarchy, cut at
    `contour_threshold`; "grid" = ~`contour_segments_per_image` grid-seeded watershed cells."""
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    tags, weak_labels = weak_targets(samples, num_classes, weak_config)
    edges = compute_edges(images, edge_source, batch_size, progress) if edge_source == "none" else cached(
        key_for("edges", images, edge_source),
        lambda: torch.from_numpy(compute_edges(images, edge_source, batch_size, progress))).numpy()
    contours = torch.from_numpy(np.stack([
        region_map(e, contour_method, contour_segments_per_image, contour_threshold)
        if edge_source != "none"
        else np.zeros(e.shape, dtype=np.int64) for e in edges
    ]).astype(np.int64))
    features = None if model is None else cached(
        features_key(images, model), lambda: compute_features(model, images, batch_size, progress))
    return PreparedSet(
        images=images,
        masks=masks,
        weak_labels=weak_labels,
        dense_labels=downsample_labels(masks, num_classes),
        contours=sample_centres(contours),
        tags=tags,
        features=features,
        image_ids=[s.image_id for s in samples],
        valid=sample_centres(torch.from_numpy(np.stack([s.valid_mask() for s in samples]))),
    )


def weak_targets(samples: list[Sample], num_classes: int, weak_config: WeakLabelConfig):
    """-> (tags (N, K) bool, weak pixel labels (N, h, w) long at stride 4), one fixed draw per
    image (seeded by its id), as an annotator would give them once."""
    tags, labels, _ = weak_annotations(samples, num_classes, weak_config)
    return tags, labels


def weak_annotations(samples: list[Sample], num_classes: int, weak_config: WeakLabelConfig):
    """`weak_targets` plus the boxes: -> (tags, labels, boxes), boxes a list per image of
    `(class, x0, y0, x1, y1)` in image pixels (empty unless the kind is "boxes")."""
    weak = [
        make_weak_labels(s.mask, num_classes, weak_config, rng_for_image(weak_config.seed, s.image_id))
        for s in samples
    ]
    tags = torch.from_numpy(np.stack([w.tags for w in weak]))
    full_res = torch.from_numpy(np.stack([w.pixel_labels for w in weak]))
    return tags, downsample_labels(full_res, num_classes), [w.boxes for w in weak]


def with_cam_labels(prepared: PreparedSet, background_class: int | None, seed: int) -> PreparedSet:
    """Tags supervision: replace the (empty) pixel labels by CAM pseudo labels."""
    if prepared.features is None:
        raise ValueError("CAM pseudo labels need cached backbone features")
    prepared.weak_labels = cam_pseudo_labels(
        prepared.features, prepared.tags, background_class, seed=seed, valid=prepared.valid
    )
    return prepared


def with_box_cam_labels(prepared: PreparedSet, boxes: list[list], background_class: int | None,
                        seed: int, window: int = 1) -> PreparedSet:
    """Box supervision: replace the painted boxes by SPML's box-CAM labels (cam.box_cam_labels):
    inside a box only pixels whose in-box normalised CAM reaches 0.5 keep the box's class."""
    if prepared.features is None:
        raise ValueError("box-CAM labels need cached backbone features")
    prepared.weak_labels = box_cam_labels(
        prepared.features, prepared.tags, boxes, background_class, OUTPUT_STRIDE, seed=seed,
        valid=prepared.valid, window=window,
    )
    return prepared


def features_key(images: torch.Tensor, model: EmbeddingNet) -> str:
    """The feature cache's key for `model.features(images)`: the images, the backbone's weights
    and every setting that shapes the features (which blocks, their normalisation, the texture
    blocks, the colour code), so a run with other settings never reads another's features."""
    config = model.config
    return key_for("features", images, model.backbone, tuple(config.feature_blocks), config.block_norm,
                   tuple(config.texture_blocks), config.colour_bins)


@torch.no_grad()
def compute_features(model: EmbeddingNet, images: torch.Tensor, batch_size: int, progress: bool):
    """Backbone hypercolumns (N, C, h, w) as float16 (halves the cache; the head trains in fp32)."""
    device = next(model.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="backbone features",
                      disable=not progress, unit="batch"):
        batch = images[start : start + batch_size].to(device).float()
        chunks.append(model.features(batch).half().cpu())
    return torch.cat(chunks)


def compute_edges(images: torch.Tensor, source: str, batch_size: int, progress: bool) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, H, W) float32 edge strength in [0, 1].

    "hed": the ported HED detector (the paper's choice); "sobel": a gradient magnitude, for
    tests and the from-scratch backbone where loading VGG16 would dominate the run time;
    "none": no edges (one contour region per image), for runs that do not use relation V.
    """
    if source == "none":  # the CE baselines use no contour relation
        return np.zeros((images.shape[0], *images.shape[2:]), dtype=np.float32)
    if source == "sobel":
        return np.stack([_sobel(img.permute(1, 2, 0).numpy()) for img in images])
    if source != "hed":
        raise ValueError(f"unknown edge source {source!r}; choose 'hed' or 'sobel'")
    from segsearch.spml.hed import HedEdgeDetector

    detector = HedEdgeDetector.pretrained()
    outputs = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="HED edges",
                          disable=not progress, unit="batch"):
            outputs.append(detector(images[start : start + batch_size].float())[:, 0].numpy())
    return np.concatenate(outputs).astype(np.float32)


def _sobel(image: np.ndarray) -> np.ndarray:
    magnitude = sobel(rgb2gray(image))
    return (magnitude / max(float(magnitude.max()), 1e-6)).astype(np.float32)


def sample_centres(maps: torch.Tensor, stride: int = OUTPUT_STRIDE) -> torch.Tensor:
    """(N, H, W) -> (N, ceil(H/s), ceil(W/s)): the value at the centre of each s x s cell."""
    height, width = maps.shape[-2:]
    rows = torch.clamp(torch.arange(0, height, stride) + stride // 2, max=height - 1)
    cols = torch.clamp(torch.arange(0, width, stride) + stride // 2, max=width - 1)
    return maps[:, rows][:, :, cols]


def downsample_labels(labels: torch.Tensor, num_classes: int, stride: int = OUTPUT_STRIDE,
                      chunk: int = 16):
    """(N, H, W) labels (255 = none) -> (N, h, w): each cell takes its most frequent *labelled*
    class, so a one-pixel click or a thin scribble survives the downsampling. `chunk` images at
    a time: the one-hot is (chunk, classes, H, W), which for hundreds of classes must not be
    built for the whole set at once."""
    return torch.cat([_downsample_chunk(labels[start:start + chunk], num_classes, stride)
                      for start in range(0, labels.shape[0], chunk)]) if labels.shape[0] else \
        _downsample_chunk(labels, num_classes, stride)


def _downsample_chunk(labels: torch.Tensor, num_classes: int, stride: int) -> torch.Tensor:
    one_hot = torch.zeros(labels.shape[0], num_classes + 1, *labels.shape[1:])
    index = labels.clamp(max=num_classes).masked_fill(labels == IGNORE_INDEX, num_classes)
    one_hot.scatter_(1, index.unsqueeze(1), 1.0)
    counts = F.avg_pool2d(one_hot[:, :num_classes], stride, stride, ceil_mode=True)
    best, label = counts.max(dim=1)
    return label.masked_fill(best <= 0, IGNORE_INDEX)
