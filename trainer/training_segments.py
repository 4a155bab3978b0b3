"""Training segments: k-means clusters split by contour region and by weak label.

SPML contrasts pixels against segments that are *pure* for every cue it trusts: a k-means
cluster of the current embeddings is cut wherever an edge-aware (HED) region boundary or a
weak-label boundary crosses it. Each resulting segment carries the attributes the four
relations need: its image, contour region, weak label, and the image's tags.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


IGNORE = 255


@dataclass
class TrainingSegments:
    """All segments of a batch, flattened.

    pixel_segment: (N,) global segment id of every pixel (N = B*h*w).
    pixel_image, pixel_label, pixel_contour: (N,) the pixel's image index, weak label
        (255 = none), contour-region id.
    segment_image, segment_label, segment_contour: (S,) the same per segment.
    prototypes: (S, D) unit-norm mean embeddings, differentiable w.r.t. the embeddings.
    """

    pixel_segment: torch.Tensor
    pixel_image: torch.Tensor
    pixel_label: torch.Tensor
    pixel_contour: torch.Tensor
    segment_image: torch.Tensor
    segment_label: torch.Tensor
    segment_contour: torch.Tensor
    prototypes: torch.Tensor

    @property
    def num_segments(self) -> int:
        return self.prototypes.shape[0]

    def select_pixels(self, index: torch.Tensor) -> "TrainingSegments":
        """The same segments, seen from a subset of pixels (the loss samples pixels; the
        prototypes stay the means over *all* pixels)."""
        return replace(
            self,
            pixel_segment=self.pixel_segment[index],
            pixel_image=self.pixel_image[index],
            pixel_label=self.pixel_label[index],
            pixel_contour=self.pixel_contour[index],
        )


def build_training_segments(
    embeddings: torch.Tensor,
    clusters: torch.Tensor,
    contours: torch.Tensor,
    pixel_labels: torch.Tensor,
) -> TrainingSegments:
    """embeddings (B, D, h, w) unit norm; clusters, contours, pixel_labels (B, h, w) long.

    Segment key = (image, cluster, contour, label); `torch.unique` turns keys into contiguous
    global ids, and the key is decoded back into the segment's attributes.
    """
    batch, dim, height, width = embeddings.shape
    images = torch.arange(batch, device=embeddings.device).view(batch, 1, 1).expand(-1, height, width)
    num_clusters = int(clusters.max()) + 1
    num_contours = int(contours.max()) + 1
    keys = ((images * num_clusters + clusters) * num_contours + contours) * (IGNORE + 1) + pixel_labels
    unique_keys, pixel_segment = torch.unique(keys.reshape(-1), return_inverse=True)
    segment_label = unique_keys % (IGNORE + 1)
    segment_contour = (unique_keys // (IGNORE + 1)) % num_contours
    segment_image = unique_keys // ((IGNORE + 1) * num_contours * num_clusters)
    flat_embeddings = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
    sums = torch.zeros(unique_keys.numel(), dim, dtype=embeddings.dtype, device=embeddings.device)
    sums = sums.index_add(0, pixel_segment, flat_embeddings)
    return TrainingSegments(
        pixel_segment=pixel_segment,
        pixel_image=images.reshape(-1),
        pixel_label=pixel_labels.reshape(-1),
        pixel_contour=contours.reshape(-1),
        segment_image=segment_image,
        segment_label=segment_label,
        segment_contour=segment_contour,
        prototypes=F.normalize(sums, dim=1),
    )
