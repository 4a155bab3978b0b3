"""The retrieval bench's mosaic set (bench/retrieval_data.py) on stand-in textures (no download)."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from retrieval_data import TEXTURE_CLASSES, MosaicMaker, MosaicSetConfig, split_sources  # noqa: E402


def fake_textures(root: Path) -> Path:
    """A tiny flat-coloured RGBA file at every path the class catalogue names."""
    rng = np.random.default_rng(0)
    for groups in TEXTURE_CLASSES.values():
        for path in (p for group in groups for p in group):
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.concatenate([rng.integers(0, 256, (8, 8, 3)), np.full((8, 8, 1), 255)], axis=2)
            Image.fromarray(pixels.astype(np.uint8), "RGBA").save(target.with_suffix(".png"), format="PNG")
            target.with_suffix(".png").rename(target)
    return root


def test_index_and_query_use_disjoint_whole_groups_of_every_class():
    split = split_sources(MosaicSetConfig())
    for name, groups in TEXTURE_CLASSES.items():
        index, query = set(split["index"][name]), set(split["query"][name])
        assert index and query and not index & query, name
        for group in groups:
            assert set(group) <= index or set(group) <= query, (name, group)
    assert split == split_sources(MosaicSetConfig())


def test_mosaics_are_deterministic_and_drawn_from_their_split_only(tmp_path):
    root = fake_textures(tmp_path)
    config = MosaicSetConfig(size=64, num_index=3, num_query=2, tile_side=16)
    allowed = split_sources(config)
    for split in ("index", "query"):
        first, again = MosaicMaker(config, root, split), MosaicMaker(config, root, split)
        for number in range(len(first)):
            mosaic = first.make(number)
            assert np.array_equal(mosaic.image, again.make(number).image)
            assert mosaic.image.shape == (64, 64, 3) and mosaic.classes.shape == (64, 64)
            present = {config.classes[c] for c in np.unique(mosaic.classes)}
            assert present == {region["class"] for region in mosaic.region_sources}
            for region in mosaic.region_sources:
                assert region["source"] in allowed[split][region["class"]]
