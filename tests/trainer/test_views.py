"""Training views (trainer/views.py): the cached horizontal mirror of every training image, and
the per-step draw of one view per image."""
import json

import pytest
import torch

from segsearch.spml.embedding import EmbeddingNet, ModelConfig
from segsearch.trainer import views as views_module
from segsearch.trainer.cli import train_config
from segsearch.trainer.config import TrainConfig
from segsearch.trainer.datasets import DataConfig
from segsearch.trainer.prepared import PreparedSet, downsample_labels
from segsearch.trainer.train import train
from segsearch.trainer.views import mirrored, originals, view_rows, with_views

IGNORE = 255


def _tiny_set(features: torch.Tensor | None = None) -> PreparedSet:
    """Two 4 x 8 images: stride-4 maps are 1 x 2 (a left and a right cell)."""
    images = torch.arange(2 * 3 * 4 * 8, dtype=torch.uint8).view(2, 3, 4, 8)
    masks = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]] * 4).expand(2, 4, 8).clone()
    return PreparedSet(
        images=images, masks=masks,
        weak_labels=torch.tensor([[[1, IGNORE]], [[IGNORE, IGNORE]]]),
        dense_labels=torch.tensor([[[0, 1]], [[1, 1]]]),
        contours=torch.tensor([[[0, 1]], [[0, 0]]]),
        tags=torch.tensor([[True, True], [False, True]]),
        features=features, image_ids=["a", "b"],
        valid=torch.tensor([[[True, False]], [[True, True]]]),
    )


def _small_model() -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet(ModelConfig(backbone="small", pretrained=False, hidden_dim=16, embedding_dim=4)).eval()


def test_mirror_flips_every_map_and_keeps_the_tags():
    mirror = mirrored(_tiny_set(), model=None)
    assert mirror.weak_labels.tolist() == [[[IGNORE, 1]], [[IGNORE, IGNORE]]]
    assert mirror.dense_labels.tolist() == [[[1, 0]], [[1, 1]]]
    assert mirror.contours.tolist() == [[[1, 0]], [[0, 0]]]
    assert mirror.valid.tolist() == [[[False, True]], [[True, True]]]
    assert mirror.masks[0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert mirror.images[1, 2, 3].tolist() == list(range(191, 183, -1))  # the last row, reversed
    assert mirror.tags.tolist() == [[True, True], [False, True]]
    assert mirror.features is None and mirror.image_ids == ["a:flip", "b:flip"]


def test_a_mirrored_click_lands_in_the_mirrored_cell():
    """Points and scribbles are full-resolution maps downsampled to stride 4 (majority of each
    4 x 4 cell): with the width a multiple of 4, flipping the stride-4 map is the map of the
    flipped annotation, so flipping the stored map is right."""
    labels = torch.full((1, 8, 12), IGNORE)
    labels[0, 1, 1] = 3  # column 1: cell 0; mirrored to column 10: cell 2
    labels[0, 5, 6:8] = 2  # columns 6-7: cell 1, which mirrors onto itself (columns 4-5)
    small = downsample_labels(labels, num_classes=4)
    assert small.tolist() == [[[3, IGNORE, IGNORE], [IGNORE, 2, IGNORE]]]
    assert downsample_labels(labels.flip(-1), num_classes=4).tolist() == \
        [[[IGNORE, IGNORE, 3], [IGNORE, 2, IGNORE]]] == small.flip(-1).tolist()


def test_mirrored_features_are_the_backbones_features_of_the_flipped_image():
    model = _small_model()
    prepared = _tiny_set()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prepared.features = model.features(images.float()).half()
    prepared.images = images
    mirror = mirrored(prepared, model, progress=False)
    with torch.no_grad():
        expected = model.features(images.flip(-1).float()).half()
    assert mirror.features.shape == prepared.features.shape == (2, expected.shape[1], 4, 4)
    assert torch.equal(mirror.features, expected)
    # the backbone is not mirror-equivariant: flipping the cached features is not the same
    assert not torch.allclose(mirror.features.float(), prepared.features.flip(-1).float(), atol=1e-2)


def test_mirrored_features_come_from_the_feature_cache_the_second_time(monkeypatch):
    model, prepared = _small_model(), _tiny_set()
    prepared.images = torch.full((2, 3, 8, 8), 7, dtype=torch.uint8)
    prepared.images[:, :, :, :3] = 200  # not symmetric, so the mirror is a new image
    prepared.features = torch.zeros(2, 1, 2, 2, dtype=torch.float16)
    calls = []
    real = views_module.compute_features
    monkeypatch.setattr(views_module, "compute_features", lambda *a: calls.append(1) or real(*a))
    first = mirrored(prepared, model, progress=False).features
    second = mirrored(prepared, model, progress=False).features
    assert len(calls) == 1 and torch.equal(first, second)


def test_views_stack_view_major_and_originals_are_the_first_view():
    prepared = _tiny_set()
    both = with_views(prepared, "flip", model=None)
    assert both.views == 2 and len(both) == 4 and both.num_images == 2
    assert both.weak_labels.tolist() == [[[1, IGNORE]], [[IGNORE, IGNORE]], [[IGNORE, 1]], [[IGNORE, IGNORE]]]
    assert both.tags[2:].tolist() == prepared.tags.tolist()
    assert both.image_ids == ["a", "b", "a:flip", "b:flip"]
    first = originals(both)
    assert first.views == 1 and first.image_ids == ["a", "b"]
    for name in ("images", "masks", "weak_labels", "dense_labels", "contours", "tags", "valid"):
        assert torch.equal(getattr(first, name), getattr(prepared, name)), name
    assert with_views(prepared, "none", model=None) is prepared
    assert with_views(both, "flip", model=None) is both  # views are added once


def test_flip_needs_a_width_divisible_by_the_stride_and_features_need_the_model():
    prepared = _tiny_set()
    prepared.images = prepared.images[..., :6]
    with pytest.raises(ValueError, match="divisible by 4"):
        mirrored(prepared, model=None)
    with pytest.raises(ValueError, match="backbone"):
        mirrored(_tiny_set(features=torch.zeros(2, 1, 1, 2)), model=None)
    with pytest.raises(ValueError, match="views"):
        TrainConfig(views="scale")


def test_view_draw_is_reproducible_and_uses_both_views():
    batch = torch.tensor([3, 0, 7, 5, 1, 2, 6, 4])
    rows = view_rows(batch, num_images=8, views=2, seed=1, step=5)
    assert torch.equal(rows, view_rows(batch, 8, 2, seed=1, step=5))
    assert torch.equal(rows % 8, batch)  # the same images, each as one of its views
    drawn = torch.stack([view_rows(batch, 8, 2, seed=1, step=s) // 8 for s in range(20)])
    assert set(drawn.flatten().tolist()) == {0, 1}
    assert 0.3 < drawn.float().mean() < 0.7  # about half of the entries are mirrors
    assert not torch.equal(drawn[0], drawn[1])  # a new draw every step
    assert not torch.equal(rows, view_rows(batch, 8, 2, seed=2, step=5))
    assert torch.equal(view_rows(batch, 8, 1, seed=1, step=5), batch)  # one view: no draw


def test_cli_flag_sets_the_views(tmp_path):
    import argparse

    from segsearch.trainer.cli import add_train_parser

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    assert train_config(parser.parse_args(["train", "--views", "flip"])).views == "flip"
    assert train_config(parser.parse_args(["train"])).views == "none"


def _config(out_dir, **overrides):
    values = dict(out_dir=str(out_dir), backbone="small", pretrained=False, edge_source="sobel",
                  data=DataConfig(image_size=64, num_train=16, num_test=4), steps=6, batch_size=8,
                  lr=3e-3, checkpoint_every=3, progress=False, inference_grid=(4, 4), views="flip")
    values.update(overrides)
    return TrainConfig(**values)


def test_training_with_flip_views_resumes_exactly_and_differs_from_no_views(tmp_path, monkeypatch):
    from segsearch.trainer import train as train_module

    uninterrupted = train(_config(tmp_path / "a"))
    real_step = train_module._train_step

    def killed_at_step_5(config, model, optimizer, prepared, bank, loss_config, step, device):
        assert prepared.views == 2 and prepared.num_images == 16
        if step == 4:
            raise KeyboardInterrupt  # a kill after the step-3 checkpoint
        return real_step(config, model, optimizer, prepared, bank, loss_config, step, device)

    monkeypatch.setattr(train_module, "_train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "b"))
    monkeypatch.setattr(train_module, "_train_step", real_step)
    resumed = train(_config(tmp_path / "b", resume=True))
    assert resumed.steps == 3 and resumed.model_version == uninterrupted.model_version
    plain = train(_config(tmp_path / "c", views="none"))
    assert plain.model_version != uninterrupted.model_version
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "a" / "train_log.jsonl")]
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # no NaN
