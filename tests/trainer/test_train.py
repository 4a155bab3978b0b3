"""A real (short) training run on the mosaic, from scratch, on CPU."""
import json

import numpy as np
import pytest
import torch

from segsearch.errors import CheckpointError
from segsearch.spml.checkpoint import load_checkpoint
from segsearch.spml.config import SegmenterConfig
from segsearch.spml.kmeans import KMeansConfig
from segsearch.spml.label_vote import covered
from segsearch.trainer.config import TrainConfig
from segsearch.trainer.datasets import load_split
from segsearch.trainer.label_calibration import held_out_votes
from segsearch.trainer.prepared import prepare_set
from segsearch.trainer.weak_labels import WeakLabelConfig
from segsearch.trainer.datasets import DataConfig
from segsearch.trainer.evaluate import EvalConfig, evaluate_checkpoint
from segsearch.trainer import train as train_module
from segsearch.trainer.train import batch_indices, train

DATA = DataConfig(image_size=96, num_train=48, num_test=16, seed=3)


def _config(out_dir, **overrides):
    values = dict(out_dir=str(out_dir), backbone="small", pretrained=False, edge_source="sobel",
                  data=DATA, steps=40, batch_size=8, lr=3e-3, checkpoint_every=20, progress=False,
                  inference_grid=(6, 6))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("spml")
    return train(_config(out_dir)), out_dir


def test_loss_goes_down(trained):
    _, out_dir = trained
    rows = [json.loads(line) for line in open(out_dir / "train_log.jsonl")]
    losses = np.array([row["loss"] for row in rows])
    assert len(rows) == 40 and {"V", "C", "O"} <= set(rows[0])
    assert losses[-10:].mean() < 0.85 * losses[:5].mean()
    assert (out_dir / "loss_curve.png").stat().st_size > 1000


def test_beats_chance_and_writes_overlays(trained):
    result, out_dir = trained
    report = evaluate_checkpoint(EvalConfig(checkpoint=str(result.checkpoint_path), inference_grid=(6, 6),
                                            progress=False, baselines=False))
    spml, chance = report.scores["SPML k-NN"].miou, report.scores["chance"].miou
    assert spml > chance + 0.10, (spml, chance)
    for name in ("eval_overlays.png", "eval_confusion.png", "eval.json"):
        assert (out_dir / name).stat().st_size > 100


def test_label_bank_is_calibrated_on_the_held_out_split(trained):
    result, _ = trained
    checkpoint = load_checkpoint(result.checkpoint_path)
    bank, model = checkpoint.label_bank, checkpoint.build_model()
    assert -1.0 < bank.min_similarity < 1.0 and 0.0 < bank.min_share <= 1.0
    test = prepare_set(load_split(DATA, "test").samples, len(checkpoint.config.class_names),
                       WeakLabelConfig(kind="full"), model, edge_source="none", progress=False)
    kmeans = KMeansConfig(grid=(6, 6), iterations=TrainConfig().kmeans_iterations)
    details = held_out_votes(model, test, bank, kmeans, SegmenterConfig.knn_k, torch.device("cpu"))
    assert covered(details, bank).float().mean() >= 1 - 2 * TrainConfig().label_quantile


def test_resume_replays_an_interrupted_run_exactly(tmp_path, monkeypatch):
    small = dict(steps=6, checkpoint_every=3, data=DataConfig(image_size=64, num_train=16, num_test=4))
    uninterrupted = train(_config(tmp_path / "a", **small))
    real_step = train_module._train_step

    def killed_at_step_5(config, model, optimizer, prepared, bank, loss_config, step, device):
        if step == 4:
            raise KeyboardInterrupt  # stands in for a kill after the step-3 checkpoint
        return real_step(config, model, optimizer, prepared, bank, loss_config, step, device)

    monkeypatch.setattr(train_module, "_train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "b", **small))
    monkeypatch.setattr(train_module, "_train_step", real_step)
    resumed = train(_config(tmp_path / "b", resume=True, **small))
    assert resumed.steps == 3  # steps 4..6 only
    assert resumed.model_version == uninterrupted.model_version  # bit-identical weights
    again = train(_config(tmp_path / "b", resume=True, **small))  # a finished run: nothing to train
    assert again.steps == 0 and again.final_loss == pytest.approx(resumed.final_loss)


def test_resuming_under_other_settings_is_refused(tmp_path):
    small = dict(steps=2, checkpoint_every=1, data=DataConfig(image_size=64, num_train=8, num_test=4))
    train(_config(tmp_path, **small))
    with pytest.raises(CheckpointError, match=r"other settings \(seed: 0 -> 1, views: 'none' -> 'flip'\)"):
        train(_config(tmp_path, resume=True, seed=1, views="flip", **small))
    assert train(_config(tmp_path, resume=True, **dict(small, steps=3))).steps == 1  # more steps: allowed


def test_batches_depend_only_on_step_and_seed():
    first = batch_indices(7, 8, 20, seed=1)
    assert first.tolist() == batch_indices(7, 8, 20, seed=1).tolist()
    epoch = np.concatenate([batch_indices(s, 5, 20, 0).numpy() for s in range(4)])
    assert sorted(epoch.tolist()) == list(range(20))  # one epoch visits each image once
