"""Choose the weights of the general model's parts on pictures it never saw.

The embedding is `[sqrt(w_head) * head, sqrt(w_texture) * block 3, sqrt(w_colour) * Lab code]`
(`spml/embedding.py`). Which mix retrieves best is measured here, not guessed: mosaics of
held-out pictures (one class each) are made twice, from the left and from the right part of
every picture (`trainer/mosaic.py` splits), and every ground-truth region of the second set
queries the regions of the first by cosine of mean embeddings (P@10: share of the 10 nearest
regions of the query's picture). A grid of weights in steps of 0.1 is scored; the best with a
head weight of at least 0.1 is kept (the learned part stays in the embedding), and every
row, the parts alone included, goes to `weights.json`.
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segsearch.spml.checkpoint import load_checkpoint
from segsearch.spml.embedding import ModelConfig
from segsearch.trainer.datasets import load_texture_folder
from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic

log = logging.getLogger("choose_weights")
TEXTURE_BLOCKS = (3,)
EMBED_SIZE = 320  # what the indexer embeds at (spml/config.py SegmenterConfig.embed_size)
# ~3.5 regions a mosaic: with 30 pictures, ~11 index regions of each, so P@10 can reach 1 (with
# 60 pictures and 64 mosaics a class had ~4 and P@10 could not pass ~0.4: every mix scored alike)
INDEX_MOSAICS, QUERY_MOSAICS = 96, 32
# (head, texture, colour) shares the parts are measured at; `mix` rescales them to any other
PROBE = (0.4, 0.3, 0.3)


def part_means(checkpoint_path: Path, folder: Path, seed: int, count: int, split: str):
    """((R, D_head), (R, D_texture), (R, D_colour)) mean parts of every ground-truth region of
    `count` mosaics of `split`, and (R,) their classes."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = ModelConfig.from_dict({**checkpoint.config.to_dict(), "texture_blocks": TEXTURE_BLOCKS,
                                    "texture_weight": PROBE[1], "colour_bins": 6, "colour_weight": PROBE[2]})
    checkpoint.config = config
    model = checkpoint.build_model()
    sources = load_texture_folder(folder)
    mosaic = TextureMosaic(MosaicConfig(size=256, num_images=count, seed=seed, split=split,
                                        textures=tuple(sources), max_regions=min(5, len(sources))), sources)
    dims = np.cumsum([0, config.embedding_dim, config.texture_dim, config.colour_dim])
    parts, classes = [[], [], []], []
    for index in range(count):
        sample = mosaic[index]
        image = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float()
        image = F.interpolate(image, size=(EMBED_SIZE, EMBED_SIZE), mode="bilinear", align_corners=False)
        with torch.no_grad():
            embeddings = model(image)[0]  # (D, 80, 80)
        truth = torch.from_numpy(sample.mask)[None, None].float()
        truth = F.interpolate(truth, size=embeddings.shape[1:], mode="nearest")[0, 0].long()
        for class_index in truth.unique().tolist():
            mean = embeddings[:, truth == class_index].mean(dim=1).numpy()
            for number in range(3):
                parts[number].append(mean[dims[number]:dims[number + 1]])
            classes.append(class_index)
    return [np.stack(p) for p in parts], np.asarray(classes)


def precision_at_10(queries, candidates, query_class, candidate_class) -> float:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    top = np.argsort(-(unit(queries) @ unit(candidates).T), axis=1)[:, :10]
    return float((candidate_class[top] == query_class[:, None]).mean())


def mix(parts, weights) -> np.ndarray:
    """Parts scaled as the model scales them: a pixel's part is unit norm times sqrt(weight)."""
    scale = [np.sqrt(weight / probe) for weight, probe in zip(weights, PROBE, strict=True)]
    return np.concatenate([part * s for part, s in zip(parts, scale, strict=True)], axis=1)


def choose_weights(checkpoint_path: Path, folder: Path, seed: int, report: Path) -> dict:
    index_parts, index_class = part_means(checkpoint_path, folder, seed, INDEX_MOSAICS, "train")
    query_parts, query_class = part_means(checkpoint_path, folder, seed, QUERY_MOSAICS, "test")
    rows = []
    steps = [round(0.1 * n, 1) for n in range(11)]
    for head, texture in itertools.product(steps, steps):
        colour = round(1.0 - head - texture, 1)
        if colour < 0:
            continue
        score = precision_at_10(mix(query_parts, (head, texture, colour)),
                                mix(index_parts, (head, texture, colour)), query_class, index_class)
        rows.append({"head": head, "texture": texture, "colour": colour, "p_at_10": score})
    eligible = [r for r in rows if r["head"] >= 0.1 and r["texture"] > 0 and r["colour"] > 0]
    best = max(eligible, key=lambda r: r["p_at_10"])
    report.write_text(json.dumps({"best": best, "rows": rows, "regions": {"index": len(index_class),
                                                                         "query": len(query_class)}}, indent=1))
    for name, weights in (("head alone", (1, 0, 0)), ("texture alone", (0, 1, 0)), ("colour alone", (0, 0, 1))):
        alone = next(r for r in rows if (r["head"], r["texture"], r["colour"]) == weights)
        log.info("validation P@10, %s: %.3f", name, alone["p_at_10"])
    log.info("validation P@10, best mix %s: %.3f (all rows in %s)", best, best["p_at_10"], report)
    return {"texture_blocks": TEXTURE_BLOCKS, "texture_weight": best["texture"], "colour_bins": 6,
            "colour_weight": best["colour"]}
