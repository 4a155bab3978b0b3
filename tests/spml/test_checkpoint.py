import pytest
import torch

from segsearch.errors import CheckpointError
from segsearch.spml.checkpoint import Checkpoint, LabelBank, load_checkpoint, save_checkpoint
from segsearch.spml.embedding import EmbeddingNet, ModelConfig


def _checkpoint(seed=0, **config):
    torch.manual_seed(seed)
    model_config = ModelConfig(backbone="small", pretrained=False, class_names=["a", "b"], **config)
    model = EmbeddingNet(model_config)
    bank = LabelBank(torch.nn.functional.normalize(torch.randn(4, model_config.embedding_dim), dim=1),
                     torch.tensor([0, 1, 1, 0]))
    return Checkpoint(model_config, model.state_dict(), bank, train_state={"step": 3})


def test_round_trip_keeps_weights_bank_and_version(tmp_path):
    checkpoint = _checkpoint()
    version = save_checkpoint(checkpoint, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded.model_version == version == checkpoint.model_version
    assert torch.equal(loaded.label_bank.labels, checkpoint.label_bank.labels)
    images = torch.rand(1, 3, 16, 16) * 255
    original = EmbeddingNet(checkpoint.config)
    original.load_state_dict(checkpoint.state_dict)
    assert torch.allclose(loaded.build_model()(images), original.eval()(images))
    assert loaded.train_state["step"] == 3


def test_version_is_a_content_hash():
    assert _checkpoint(seed=0).model_version == _checkpoint(seed=0).model_version
    assert _checkpoint(seed=0).model_version != _checkpoint(seed=1).model_version


def test_checkpoint_from_another_config_is_refused_with_the_difference(tmp_path):
    save_checkpoint(_checkpoint(embedding_dim=32), tmp_path / "c.pt")
    expected = ModelConfig(backbone="small", pretrained=False, embedding_dim=64)
    with pytest.raises(CheckpointError, match="embedding_dim=32 \\(expected 64\\)"):
        load_checkpoint(tmp_path / "c.pt", expected=expected)


def test_missing_and_corrupt_files_give_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a segsearch checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_tampered_weights_do_not_match_the_version(tmp_path):
    checkpoint = _checkpoint()
    save_checkpoint(checkpoint, tmp_path / "c.pt")
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] += 1
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "c.pt")


def test_label_bank_thresholds_survive_save_and_load(tmp_path):
    checkpoint = _checkpoint()
    checkpoint.label_bank.min_similarity, checkpoint.label_bank.min_share = 0.625, 0.35
    save_checkpoint(checkpoint, tmp_path / "c.pt")
    bank = load_checkpoint(tmp_path / "c.pt").label_bank
    assert (bank.min_similarity, bank.min_share) == (0.625, 0.35)


def test_a_checkpoint_written_before_thresholds_loads_with_a_bank_covering_everything(tmp_path):
    save_checkpoint(_checkpoint(), tmp_path / "c.pt")
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    del payload["label_bank"]["min_similarity"], payload["label_bank"]["min_share"]
    torch.save(payload, tmp_path / "c.pt")  # what format 1 looked like before the thresholds
    bank = load_checkpoint(tmp_path / "c.pt").label_bank
    assert (bank.min_similarity, bank.min_share) == (-1.0, 0.0)
    assert torch.equal(bank.labels, torch.tensor([0, 1, 1, 0]))


def test_thresholds_out_of_range_are_refused():
    with pytest.raises(ValueError, match="min_similarity"):
        LabelBank(torch.eye(2), torch.tensor([0, 1]), min_similarity=1.5)
