"""Which images the trainer reads: the built-in mosaic, a folder of textures, or PASCAL VOC.

`textures:DIR` builds the same warped-Voronoi mosaics as the built-in one from every image in
DIR, each image its own class (its file stem): diverse pictures whose only "label" is which
picture a region came from, the weak signal that trains the general model
(`scripts/train_general_model.py`).

Both become a list of `Sample`s of one fixed square size, so that batches stack and the
frozen-backbone feature cache is a single tensor. VOC images are resized (longest side =
`image_size`) and padded rather than cropped, so no object is cut. The padding is labelled
ignore (255) *and* marked invalid in `Sample.valid`, so that training drops it from k-means
segments and every relation (as SPML drops void pixels), instead of treating black padding
as unlabelled image content.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from segsearch.errors import DatasetError
from segsearch.trainer.mosaic import MosaicConfig, TextureMosaic
from segsearch.trainer.sample import IGNORE_INDEX, Sample


TEXTURES_PREFIX = "textures:"
TEXTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tga", ".bmp")


@dataclass
class DataConfig:
    dataset: str = "mosaic"  # "mosaic", "textures:DIR" (one class per image) or a VOC2012 directory
    image_size: int = 128
    num_train: int = 240  # mosaic only; VOC uses its image lists
    num_test: int = 60
    seed: int = 0
    num_val: int = 60  # mosaic only: held-out images of the training band (see load_split)


@dataclass
class LoadedSplit:
    samples: list[Sample]
    class_names: list[str]
    background_class: int | None


SPLIT_NAMES = ("train", "val", "test")


def load_split(config: DataConfig, split: str) -> LoadedSplit:
    """split: "train", "val" or "test" (VOC: test reads VOC's "val" list; VOC has no val here).

    A mosaic's "val" images are mosaics `num_train .. num_train + num_val - 1` of the training
    band: new images the model never trained on, from the same texture crops as training, so
    that settings (the step count) are chosen without looking at the test band.
    """
    if split not in SPLIT_NAMES:
        raise DatasetError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    if config.dataset == "mosaic" or config.dataset.startswith(TEXTURES_PREFIX):
        band, first, count = _mosaic_range(config, split)
        sources = None
        mosaic_config = MosaicConfig(size=config.image_size, num_images=first + count, seed=config.seed,
                                     split=band)
        if config.dataset.startswith(TEXTURES_PREFIX):
            sources = load_texture_folder(Path(config.dataset[len(TEXTURES_PREFIX):]))
            mosaic_config = replace(mosaic_config, textures=tuple(sources),
                                    max_regions=min(mosaic_config.max_regions, len(sources)))
        mosaic = TextureMosaic(mosaic_config, sources)
        samples = [mosaic[i] for i in range(first, len(mosaic))]
        names, background = list(mosaic.class_names), None
    else:
        from segsearch.trainer.voc import VocDataset

        if split == "val":
            raise DatasetError("VOC has no validation split here: its val list is the test split")
        root = Path(config.dataset)
        if not root.is_dir():
            raise DatasetError(
                f"dataset path {root} does not exist; give a VOC2012 directory or 'mosaic'"
            )
        voc = VocDataset(root, split="train" if split == "train" else "val")
        samples = [_fit_square(voc[i], config.image_size) for i in range(len(voc))]
        names, background = list(voc.class_names), 0
    if not samples:
        raise DatasetError(f"the {split} split of {config.dataset} has no images")
    return LoadedSplit(samples, names, background)


def _mosaic_range(config: DataConfig, split: str) -> tuple[str, int, int]:
    """(mosaic band, first index, count) of `split`: val continues the training band's images."""
    if split == "train":
        return "train", 0, config.num_train
    if split == "val":
        return "train", config.num_train, config.num_val
    return "test", 0, config.num_test


def load_texture_folder(folder: Path) -> dict[str, np.ndarray]:
    """Every image of `folder` (sorted by name) as `{stem: (H, W, 3) uint8}`."""
    if not folder.is_dir():
        raise DatasetError(f"texture folder {folder} does not exist (textures:DIR needs a folder of images)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in TEXTURE_SUFFIXES)
    if len(paths) < 2:
        raise DatasetError(f"texture folder {folder} holds {len(paths)} images; a mosaic needs at least 2")
    if len(paths) >= IGNORE_INDEX:
        raise DatasetError(f"texture folder {folder} holds {len(paths)} images, one class each; at most "
                           f"{IGNORE_INDEX - 1} classes fit (label {IGNORE_INDEX} means unlabelled)")
    return {path.stem: np.asarray(Image.open(path).convert("RGB")) for path in paths}


def _fit_square(sample: Sample, size: int) -> Sample:
    """Resize so the longest side is `size`, then pad to (size, size); mask padded with 255
    and `valid` False on the padding."""
    height, width = sample.mask.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    image = np.asarray(Image.fromarray(sample.image).resize((new_w, new_h), Image.BILINEAR))
    mask = np.asarray(
        Image.fromarray(sample.mask.astype(np.uint8)).resize((new_w, new_h), Image.NEAREST)
    ).astype(np.int64)
    padded_image = np.zeros((size, size, 3), dtype=np.uint8)
    padded_mask = np.full((size, size), IGNORE_INDEX, dtype=np.int64)
    padded_image[:new_h, :new_w] = image
    padded_mask[:new_h, :new_w] = mask
    valid = np.zeros((size, size), dtype=bool)
    valid[:new_h, :new_w] = True
    return Sample(padded_image, padded_mask, sample.image_id, valid)
