"""SPML's four relations as positive/negative sets for the SegSort+ loss.

- V, low-level image similarity: within one image, segments of the same edge-aware (HED
  contour) region are positives, other regions of that image negatives; with location
  (default), in the space of the embedding concatenated with the pixel's (y, x), as SPML.
- C, semantic annotation: a weakly labelled pixel and segments with the same weak label
  (in the batch and the memory bank) are positives, other labels negatives.
- O, semantic co-occurrence: segments of images that share an image tag with the pixel's
  image are positives, segments of images sharing none are negatives.
- A, feature affinity: an *unlabelled* segment borrows the label set of its nearest
  labelled segments of the same image (top `affinity_top_k`, each only when its prototype's
  cosine similarity is at least `affinity_threshold` = 0.95), as SPML's
  `gather_multiset_labels_per_batch_by_nearest_neighbor` does; its pixels then contrast
  labelled prototypes (batch and memory bank) with a label in the set (positives) against
  the other labelled prototypes. Segments with no neighbour that close take no part.
  Described in the paper, off in its VOC configs: weight 0 by default here too.

Pixels without a weak label take part in V, O and A; only C needs a label. Padded pixels
(segment -1, see training_segments.py) take part in nothing.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from segsearch.trainer.loss import PixelSum, segsort_loss, segsort_plus_positives
from segsearch.trainer.training_segments import IGNORE, TrainingSegments, with_location

SUPERVISIONS = ("tags", "boxes", "scribbles", "points", "full")


@dataclass
class Relation:
    weight: float
    concentration: float


@dataclass
class LossConfig:
    """Per-relation weight (lambda) and concentration (kappa); the table in docs/method.md (SPML's released VOC configs)."""

    annotation: Relation = field(default_factory=lambda: Relation(1.0, 6.0))
    cooccurrence: Relation = field(default_factory=lambda: Relation(0.5, 12.0))
    lowlevel: Relation = field(default_factory=lambda: Relation(0.1, 16.0))
    affinity: Relation = field(default_factory=lambda: Relation(0.0, 8.0))
    affinity_top_k: int = 3  # labelled neighbours an unlabelled segment may borrow labels from
    affinity_threshold: float = 0.95  # minimum cosine similarity of a borrowed neighbour
    memory_batches: int = 2


# Released SPML VOC configs (C, O, V); "full" reuses the scribble values.
REFERENCE_VALUES = {
    "tags": ((0.3, 6), (0.3, 8), (0.1, 16)),
    "boxes": ((0.3, 6), (0.3, 8), (0.1, 16)),
    "scribbles": ((1.0, 6), (0.5, 12), (0.1, 16)),
    "points": ((0.1, 6), (0.1, 8), (0.1, 16)),
    "full": ((1.0, 6), (0.5, 12), (0.1, 16)),
}


def default_loss_config(supervision: str) -> LossConfig:
    if supervision not in REFERENCE_VALUES:
        raise ValueError(f"unknown supervision {supervision!r}; choose from {SUPERVISIONS}")
    (c_w, c_k), (o_w, o_k), (v_w, v_k) = REFERENCE_VALUES[supervision]
    return LossConfig(Relation(c_w, c_k), Relation(o_w, o_k), Relation(v_w, v_k))


@dataclass
class BankEntry:
    prototypes: torch.Tensor  # (S, D), detached
    labels: torch.Tensor  # (S,) weak label, 255 = none
    tags: torch.Tensor  # (S, C) bool, the tags of the segment's image


class MemoryBank:
    """Prototypes of the last few batches, detached: extra negatives (and positives) for C and O."""

    def __init__(self, num_batches: int):
        self.entries: deque[BankEntry] = deque(maxlen=max(num_batches, 0) or None)
        self.enabled = num_batches > 0

    def push(self, segments: TrainingSegments, image_tags: torch.Tensor) -> None:
        self.push_entry(
            BankEntry(
                segments.prototypes.detach(),
                segments.segment_label,
                image_tags[segments.segment_image],
            )
        )

    def push_entry(self, entry: BankEntry) -> None:
        """Push prepared rows, e.g. the whole global batch's segments gathered from every
        process, so that all processes keep the same bank (trainer/ddp.py)."""
        if self.enabled:
            self.entries.append(entry)

    def state(self) -> list[dict]:
        """Plain tensors, saved in checkpoints so that a resumed run contrasts against the
        same negatives as an uninterrupted one."""
        return [{"prototypes": e.prototypes.cpu(), "labels": e.labels.cpu(), "tags": e.tags.cpu()}
                for e in self.entries]

    def load_state(self, state: list[dict], device) -> None:
        self.entries.clear()
        for entry in state:
            self.entries.append(BankEntry(entry["prototypes"].to(device), entry["labels"].to(device),
                                          entry["tags"].to(device)))

    def concat(self, dim: int, num_classes: int, device) -> BankEntry:
        if not self.entries:
            return BankEntry(
                torch.zeros(0, dim, device=device),
                torch.zeros(0, dtype=torch.long, device=device),
                torch.zeros(0, num_classes, dtype=torch.bool, device=device),
            )
        return BankEntry(
            torch.cat([e.prototypes for e in self.entries]),
            torch.cat([e.labels for e in self.entries]),
            torch.cat([e.tags for e in self.entries]),
        )


def relation_losses(
    pixel_embeddings: torch.Tensor,
    segments: TrainingSegments,
    image_tags: torch.Tensor,
    bank: BankEntry,
    config: LossConfig,
    reduction: str = "mean",
) -> dict[str, torch.Tensor | PixelSum]:
    """Weighted loss per relation. pixel_embeddings (N, D); image_tags (B, C) bool.

    `bank` holds every prototype beyond the batch's own segments (never a pixel's own
    segment): the memory bank, and under data-parallel training first the other processes'
    segments of the global batch, carrying gradient. reduction="sum" returns PixelSums for
    a mean over the global batch (trainer/ddp.py).

    Padded pixels (segment -1) are dropped first: padding reaches no relation."""
    inside = segments.valid_pixels
    if not bool(inside.all()):
        pixel_embeddings, segments = pixel_embeddings[inside], segments.select_pixels(inside)
    own = _own_segment(segments, extra=bank.prototypes.shape[0])
    prototypes = torch.cat([segments.prototypes, bank.prototypes])
    losses = {}
    if config.lowlevel.weight:
        losses["V"] = config.lowlevel.weight * _lowlevel(pixel_embeddings, segments, own, config,
                                                         reduction)
    if config.annotation.weight:
        losses["C"] = config.annotation.weight * _annotation(
            pixel_embeddings, segments, bank, prototypes, own, config, reduction
        )
    if config.cooccurrence.weight:
        losses["O"] = config.cooccurrence.weight * _cooccurrence(
            pixel_embeddings, segments, image_tags, bank, prototypes, own, config, reduction
        )
    if config.affinity.weight:
        losses["A"] = config.affinity.weight * _affinity(
            pixel_embeddings, segments, bank, prototypes, own, config, reduction
        )
    return losses


def _own_segment(segments: TrainingSegments, extra: int) -> torch.Tensor:
    """(N, S + extra) bool: True at each pixel's own segment; bank columns are never own."""
    columns = torch.arange(segments.num_segments + extra, device=segments.pixel_segment.device)
    return columns.unsqueeze(0) == segments.pixel_segment.unsqueeze(1)


def _contrast(embeddings, prototypes, same_group, own, candidates, concentration, reduction):
    positive, excluded = segsort_plus_positives(same_group & candidates, own & candidates)
    negative = candidates & ~same_group & ~excluded
    return segsort_loss(embeddings, prototypes, positive, negative, concentration, reduction)


def _lowlevel(embeddings, segments, own, config, reduction):
    """V within each image. With location (`segments.location_prototypes`), pixels and
    prototypes are compared in SPML's embedding-with-location space (`with_location`)."""
    count = segments.num_segments
    own = own[:, :count]
    prototypes = segments.prototypes
    if segments.location_prototypes is not None:
        embeddings = with_location(embeddings, segments.pixel_location)
        prototypes = segments.location_prototypes
    same_image = segments.pixel_image.unsqueeze(1) == segments.segment_image.unsqueeze(0)
    same_region = same_image & (
        segments.pixel_contour.unsqueeze(1) == segments.segment_contour.unsqueeze(0)
    )
    return _contrast(
        embeddings, prototypes, same_region, own, same_image, config.lowlevel.concentration, reduction,
    )


def _annotation(embeddings, segments, bank, prototypes, own, config, reduction):
    labels = torch.cat([segments.segment_label, bank.labels])
    labelled_pixels = segments.pixel_label != IGNORE
    labelled_prototypes = (labels != IGNORE).unsqueeze(0)
    pixel_labels = segments.pixel_label[labelled_pixels]
    same_label = pixel_labels.unsqueeze(1) == labels.unsqueeze(0)
    return _contrast(
        embeddings[labelled_pixels],
        prototypes,
        same_label,
        own[labelled_pixels],
        labelled_prototypes.expand_as(same_label),
        config.annotation.concentration,
        reduction,
    )


def _cooccurrence(embeddings, segments, image_tags, bank, prototypes, own, config, reduction):
    segment_tags = torch.cat([image_tags[segments.segment_image], bank.tags]).float()
    pixel_tags = image_tags.float()[segments.pixel_image]
    share_tag = (pixel_tags @ segment_tags.t()) > 0
    everything = torch.ones_like(share_tag)
    return _contrast(
        embeddings, prototypes, share_tag, own, everything, config.cooccurrence.concentration, reduction
    )


def borrowed_label_sets(segments: TrainingSegments, top_k: int, threshold: float) -> torch.Tensor:
    """(S, IGNORE + 1) bool: the label set each segment borrows for relation A.

    Labelled segments borrow nothing (C covers them). An unlabelled segment takes the labels
    of its `top_k` most similar labelled segments *of the same image*, keeping only those
    whose prototype cosine similarity is >= `threshold` (SPML: top 3, 0.95). Computed
    without gradient: it only decides which prototypes are positives.
    Departure: SPML matches each pixel's embedding; we match its segment's prototype (one
    S x S similarity instead of pixels x segments, and less noisy on a 2-core budget).
    """
    with torch.no_grad():
        labelled = segments.segment_label != IGNORE
        same_image = segments.segment_image.unsqueeze(1) == segments.segment_image.unsqueeze(0)
        eligible = same_image & labelled.unsqueeze(0) & ~labelled.unsqueeze(1)
        similarity = segments.prototypes @ segments.prototypes.t()
        similarity = similarity.masked_fill(~eligible, float("-inf"))
        k = min(top_k, segments.num_segments)
        sets = torch.zeros(segments.num_segments, IGNORE + 1, dtype=torch.bool,
                           device=segments.prototypes.device)
        if k == 0:
            return sets
        nearest, index = similarity.topk(k, dim=1)
        close = nearest >= threshold  # -inf (not eligible) never passes
        rows = torch.arange(segments.num_segments, device=sets.device).unsqueeze(1).expand(-1, k)
        sets[rows[close], segments.segment_label[index[close]]] = True
    return sets


def _affinity(embeddings, segments, bank, prototypes, own, config, reduction):
    sets = borrowed_label_sets(segments, config.affinity_top_k, config.affinity_threshold)
    pixel_sets = sets[segments.pixel_segment]  # (N, IGNORE + 1)
    takes_part = pixel_sets.any(dim=1)
    labels = torch.cat([segments.segment_label, bank.labels])
    labelled_prototypes = (labels != IGNORE).unsqueeze(0)
    in_set = torch.gather(pixel_sets[takes_part], 1, labels.unsqueeze(0).expand(int(takes_part.sum()), -1))
    return _contrast(
        embeddings[takes_part], prototypes, in_set, own[takes_part],
        labelled_prototypes.expand_as(in_set), config.affinity.concentration, reduction,
    )
