"""Training segments: k-means clusters split by contour region and by weak label.

SPML contrasts pixels against segments that are *pure* for every cue it trusts: a k-means
cluster of the current embeddings is cut wherever an edge-aware (HED) region boundary or a
weak-label boundary crosses it. Each resulting segment carries the attributes the four
relations need: its image, contour region, weak label, and the image's tags.

Padding (pixels added to fit an image to the batch size, `valid` False) belongs to no
segment: SPML removes void pixels before clustering and from every loss. `masked_kmeans`
keeps it out of the k-means centroids, and `build_training_segments` gives it segment -1.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from segsearch.spml.kmeans import KMeansConfig, kmeans_features, run_kmeans


IGNORE = 255


@dataclass
class TrainingSegments:
    """All segments of a batch, flattened.

    pixel_segment: (N,) global segment id of every pixel (N = B*h*w); -1 on padding.
    pixel_image, pixel_label, pixel_contour: (N,) the pixel's image index, weak label
        (255 = none), contour-region id.
    segment_image, segment_label, segment_contour: (S,) the same per segment.
    prototypes: (S, D) unit-norm mean embeddings, differentiable w.r.t. the embeddings.
    pixel_location: (N, 2) the pixel's (y, x) in [-0.5, 0.5] (`location_features`), or None.
    location_prototypes: (S, D + 2) relation V's prototypes: unit-norm means of the pixels'
        `with_location` embeddings, or None (V then uses `prototypes`).
    """

    pixel_segment: torch.Tensor
    pixel_image: torch.Tensor
    pixel_label: torch.Tensor
    pixel_contour: torch.Tensor
    segment_image: torch.Tensor
    segment_label: torch.Tensor
    segment_contour: torch.Tensor
    prototypes: torch.Tensor
    pixel_location: torch.Tensor | None = None
    location_prototypes: torch.Tensor | None = None

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
            pixel_location=None if self.pixel_location is None else self.pixel_location[index],
        )

    @property
    def valid_pixels(self) -> torch.Tensor:
        """(N,) bool: pixels that belong to a segment (not padding)."""
        return self.pixel_segment >= 0


def location_features(height: int, width: int, device=None) -> torch.Tensor:
    """(h*w, 2) each pixel's (y, x), each axis spaced evenly over [-0.5, 0.5], row-major.

    As SPML's `generate_location_features(..., 'float') - 0.5` (spml/utils/segsort/common.py;
    `LocationColorNetwork(use_location=True)` in spml/models/embeddings/local_model.py), on the
    embedding map of the (cropped) training image."""
    ys = torch.linspace(0, 1, height, device=device) - 0.5
    xs = torch.linspace(0, 1, width, device=device) - 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_y, grid_x], dim=-1).reshape(-1, 2)


def with_location(embeddings: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """(N, D) unit-norm embeddings, (N, 2) locations -> (N, D + 2) unit norm: SPML's
    `cluster_embedding_with_loc` (spml/utils/segsort/common.py, `segment_by_kmeans`: concat
    then L2-normalise), the space its relation V (`img_sim_loss`,
    spml/models/predictions/segsort.py) contrasts pixels and prototypes in. Why: two
    regions that look alike but lie apart in the image stay apart in this space, so V's
    pull-apart of same-texture regions is partly carried by location, not by the embedding."""
    return F.normalize(torch.cat([embeddings, locations.to(embeddings.dtype)], dim=1), dim=1)


def masked_kmeans(embeddings: torch.Tensor, valid: torch.Tensor | None, config: KMeansConfig) -> torch.Tensor:
    """Spherical k-means cluster ids (B, h, w) long, with padding left out of every centroid.

    embeddings (B, D, h, w) unit norm; valid (B, h, w) bool (None: all valid).
    Why zeroing works: a centroid is the *normalised sum* of its pixels' features, so a
    zero feature adds nothing to any centroid (a cell or cluster holding only padding keeps
    its previous centroid, as an empty one does). Padded pixels still get an id; it means
    nothing and `build_training_segments` drops them. With every pixel valid this is exactly
    `spherical_kmeans(...).segment_ids`.
    """
    batch, _, height, width = embeddings.shape
    features = kmeans_features(embeddings, config.coord_weight)
    if valid is not None:
        features = features * valid.reshape(batch, -1, 1).to(features.dtype)
    ids, _ = run_kmeans(features, height, width, config)
    return ids.view(batch, height, width)


def build_training_segments(
    embeddings: torch.Tensor,
    clusters: torch.Tensor,
    contours: torch.Tensor,
    pixel_labels: torch.Tensor,
    valid: torch.Tensor | None = None,
    location: bool = False,
) -> TrainingSegments:
    """embeddings (B, D, h, w) unit norm; clusters, contours, pixel_labels (B, h, w) long;
    valid (B, h, w) bool, False on padding (None: every pixel is image content);
    location: also V's location features and prototypes (`with_location`).

    Segment key = (image, cluster, contour, label); `torch.unique` turns the keys of the
    valid pixels into contiguous global ids, and the key is decoded back into the segment's
    attributes. Padded pixels get segment -1 and add nothing to any prototype.
    """
    batch, dim, height, width = embeddings.shape
    images = torch.arange(batch, device=embeddings.device).view(batch, 1, 1).expand(-1, height, width)
    num_clusters = int(clusters.max()) + 1
    num_contours = int(contours.max()) + 1
    keys = ((images * num_clusters + clusters) * num_contours + contours) * (IGNORE + 1) + pixel_labels
    inside = torch.ones_like(keys, dtype=torch.bool) if valid is None else valid.bool()
    inside = inside.reshape(-1)
    unique_keys, inside_segment = torch.unique(keys.reshape(-1)[inside], return_inverse=True)
    pixel_segment = torch.full_like(inside, -1, dtype=torch.long)
    pixel_segment[inside] = inside_segment
    segment_label = unique_keys % (IGNORE + 1)
    segment_contour = (unique_keys // (IGNORE + 1)) % num_contours
    segment_image = unique_keys // ((IGNORE + 1) * num_contours * num_clusters)
    flat_embeddings = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
    sums = torch.zeros(unique_keys.numel(), dim, dtype=embeddings.dtype, device=embeddings.device)
    sums = sums.index_add(0, inside_segment, flat_embeddings[inside])
    pixel_location = location_prototypes = None
    if location:
        pixel_location = location_features(height, width, embeddings.device).repeat(batch, 1)
        located = with_location(flat_embeddings[inside], pixel_location[inside])
        location_prototypes = F.normalize(torch.zeros(
            unique_keys.numel(), dim + 2, dtype=embeddings.dtype, device=embeddings.device,
        ).index_add(0, inside_segment, located), dim=1)
    return TrainingSegments(
        pixel_segment=pixel_segment,
        pixel_image=images.reshape(-1),
        pixel_label=pixel_labels.reshape(-1),
        pixel_contour=contours.reshape(-1),
        segment_image=segment_image,
        segment_label=segment_label,
        segment_contour=segment_contour,
        prototypes=F.normalize(sums, dim=1),
        pixel_location=pixel_location,
        location_prototypes=location_prototypes,
    )
