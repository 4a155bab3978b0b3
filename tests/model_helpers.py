"""Helpers any test folder may use (pytest puts tests/ on sys.path through its conftest.py):
a tiny checkpoint trained once per session, another model version of it, small photographs."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segsearch.spml.checkpoint import load_checkpoint, save_checkpoint
from segsearch.spml.segmenter import SegmenterConfig

SEGMENTER = SegmenterConfig(embed_size=64, grid=(4, 4), iterations=5, min_area_fraction=0.01)


# ---- helpers shared with test_segmenter.py and test_index_cli.py -------------------------

def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 5-second checkpoint (small backbone, 16-d), trained once per pytest session.

    Its label bank is left uncalibrated (label_quantile=0: every segment gets a label): the
    suites that use it index photographs, far outside the mosaic it learns, and test retrieval
    and label filters, which need labels; open-set labels are tested in test_label_vote.py and
    test_segmenter.py with explicit thresholds."""
    from segsearch.trainer.config import TrainConfig
    from segsearch.trainer.datasets import DataConfig
    from segsearch.trainer.train import train

    root = tmp_path_factory.getbasetemp() / "tiny_index_checkpoint"
    path = root / "checkpoint.pt"
    if not path.exists():
        torch.manual_seed(0)
        train(TrainConfig(out_dir=str(root), backbone="small", pretrained=False, edge_source="sobel",
                          steps=2, batch_size=4, data=DataConfig("mosaic", 32, 8, 2), embedding_dim=16,
                          hidden_dim=32, progress=False, device="cpu", label_quantile=0.0))
    return path


def other_version_checkpoint(path: Path, out: Path) -> str:
    """Same architecture, one weight nudged: another model version. Returns that version."""
    checkpoint = load_checkpoint(path)
    name = sorted(checkpoint.state_dict)[0]
    checkpoint.state_dict[name] = checkpoint.state_dict[name] + 1e-3
    return save_checkpoint(checkpoint, out)


def photo(name: str, max_side: int = 80, flip: bool = False) -> np.ndarray:
    from skimage import data

    image = Image.fromarray(getattr(data, name)())
    image.thumbnail((max_side, max_side))
    array = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(array[:, ::-1]) if flip else array
