"""Scoring of segment retrieval against ground-truth class maps (numpy only, no I/O).

A query is a region of a query image whose ground-truth class is `query_class`. Each hit is
an indexed segment; what scoring needs of it is `class_pixels`, the number of its mask's
pixels of every class in its own image's ground truth (`np.bincount(truth[mask])`), and its
area. With that:

- precision@k: share of the first k hits whose *majority* class is the query's class (a
  missing hit, when fewer than k came back, counts as a miss);
- pixel precision: share of all pixels of the first k hits that are of the query's class;
- area ratio: the median over the first k hits of hit area / query-region area (1 = the hits
  are as big as the query; segments much smaller than the query give a ratio << 1).

`chance_scores` is what a random ranking of the same candidate segments would score in
expectation: the share of candidates whose majority class is the query's (exact for
precision@k), the query class's share of all candidate pixels (the ratio of expectations,
for pixel precision), and the median candidate area over the query area.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QueryScore:
    precision_at_k: float
    pixel_precision: float
    area_ratio: float


def majority_class(class_pixels: np.ndarray) -> int:
    """Class with the most pixels under a segment (ties: the lower class index)."""
    return int(np.argmax(class_pixels))


def score_hits(query_class: int, query_area: float, hits_class_pixels: Sequence[np.ndarray],
               k: int) -> QueryScore:
    """Score the ranked hits of one query; `hits_class_pixels[i]` is hit i's per-class pixel counts.

    `query_area` and the hit areas (sums of their class counts) must be in the same unit
    (pixels of equally sized images, or area fractions scaled alike).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if query_area <= 0:
        raise ValueError(f"the query region is empty (area {query_area})")
    top = [np.asarray(counts, dtype=np.float64) for counts in hits_class_pixels[:k]]
    if not top:
        return QueryScore(0.0, 0.0, float("nan"))
    correct = sum(majority_class(counts) == query_class for counts in top)
    pixels_of_class = sum(counts[query_class] if query_class < counts.size else 0.0 for counts in top)
    all_pixels = sum(counts.sum() for counts in top)
    areas = [counts.sum() / query_area for counts in top]
    return QueryScore(correct / k, float(pixels_of_class / all_pixels) if all_pixels else 0.0,
                      float(np.median(areas)))


def chance_scores(query_class: int, query_area: float, candidates_class_pixels: np.ndarray) -> QueryScore:
    """Expected scores of a random ranking of all candidates; `(N, C)` class counts per candidate."""
    counts = np.asarray(candidates_class_pixels, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError("candidates_class_pixels must be a non-empty (N, C) array")
    majority = counts.argmax(axis=1)
    of_class = counts[:, query_class] if query_class < counts.shape[1] else np.zeros(counts.shape[0])
    return QueryScore(float(np.mean(majority == query_class)), float(of_class.sum() / counts.sum()),
                      float(np.median(counts.sum(axis=1)) / query_area))


def rank_by_cosine(query: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k rows of `candidates` (N, F) most cosine-similar to `query` (F,), best first.

    Ties keep the lower index first (stable sort), so the ranking is deterministic.
    """
    query = np.asarray(query, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.float64)
    norms = np.linalg.norm(candidates, axis=1) * max(np.linalg.norm(query), 1e-12)
    similarity = candidates @ query / np.maximum(norms, 1e-12)
    return np.argsort(-similarity, kind="stable")[:k]


@dataclass(frozen=True)
class Summary:
    """Scores of many queries: means of precision, median of the per-query area ratios."""

    num_queries: int
    precision_at_k: float
    pixel_precision: float
    area_ratio_median: float


def summarise(scores: Iterable[QueryScore]) -> Summary:
    scores = list(scores)
    if not scores:
        return Summary(0, float("nan"), float("nan"), float("nan"))
    ratios = [s.area_ratio for s in scores if np.isfinite(s.area_ratio)]
    return Summary(len(scores), float(np.mean([s.precision_at_k for s in scores])),
                   float(np.mean([s.pixel_precision for s in scores])),
                   float(np.median(ratios)) if ratios else float("nan"))


def latency_percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / mean of call latencies, in milliseconds."""
    if not seconds:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def colour_histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    """(N, 3) uint8 RGB pixels -> (bins**3,) L1-normalised joint RGB histogram (zeros if N = 0)."""
    pixels = np.asarray(pixels, dtype=np.int64).reshape(-1, 3)
    quantised = pixels * bins // 256
    index = (quantised[:, 0] * bins + quantised[:, 1]) * bins + quantised[:, 2]
    histogram = np.bincount(index, minlength=bins**3).astype(np.float64)
    total = histogram.sum()
    return histogram / total if total else histogram
