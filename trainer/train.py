"""The SPML training loop (and the two cross-entropy baselines on the same data and head).

One step: cached frozen-backbone features -> head -> unit-norm embeddings (B, D, h, w) ->
spherical k-means (no grad) -> training segments split by contour and weak label ->
prototypes (with grad) -> SegSort+ over the relations. The baselines replace the last three
by a 1x1 classifier and cross-entropy on the weak labels (partial CE) or on every pixel
(full CE). `views="flip"` adds each image's cached mirror, one view per image drawn each
step (trainer/views.py). Seeded, resumable (checkpoint every N steps with optimiser state), poly learning
rate, a progress bar with each loss term, metrics as JSONL and a loss-curve PNG.

Under torchrun the same loop runs data-parallel (DDP, gathered prototypes, a global-batch
mean); trainer/ddp.py states the conventions. Alone it is the plain loop.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from segsearch.errors import CheckpointError, DatasetError
from segsearch.spml.device import resolve_device
from segsearch.spml.checkpoint import (
    Checkpoint, load_checkpoint, load_weights, save_checkpoint, trainable_state_dict,
)
from segsearch.spml.embedding import EmbeddingNet, ModelConfig, ResidualHead
from segsearch.spml.kmeans import KMeansConfig
from segsearch.trainer.config import TrainConfig
from segsearch.trainer.curves import plot_loss_curves
from segsearch.trainer.datasets import LoadedSplit, load_split
from segsearch.trainer.ddp import (
    Replica, World, average_floats, concat_entries, gather_segments, global_mean, make_replica,
    process_group, rank_batch, rank_pixels, share_from_main,
)
from segsearch.trainer.label_bank import build_label_bank
from segsearch.trainer.label_calibration import calibrate_on_held_out
from segsearch.trainer.loss import PixelSum
from segsearch.trainer.pixel_sampling import pick_loss_pixels
from segsearch.trainer.prepared import (
    PreparedSet, prepare_set, weak_annotations, with_box_cam_labels, with_cam_labels,
)
from segsearch.trainer.relations import MemoryBank, default_loss_config, relation_losses
from segsearch.trainer.sample import IGNORE_INDEX
from segsearch.trainer.training_segments import build_training_segments, masked_kmeans
from segsearch.trainer.views import originals, view_rows, with_views
from segsearch.trainer.weak_labels import WeakLabelConfig

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainResult:
    checkpoint_path: Path
    model_version: str
    final_loss: float
    images_per_second: float  # of the global batch, under torchrun
    steps: int
    rank: int = 0  # under torchrun, the process that returned this


def build_model_config(config: TrainConfig, class_names: list[str]) -> ModelConfig:
    return ModelConfig(
        backbone=config.backbone,
        pretrained=config.pretrained,
        feature_blocks=tuple(config.feature_blocks),
        hidden_dim=config.hidden_dim,
        embedding_dim=config.embedding_dim,
        block_norm=config.block_norm,
        colour_bins=config.colour_bins,
        colour_weight=config.colour_weight,
        head_type=config.head_type,
        num_classes=len(class_names) if config.method != "spml" else 0,
        class_names=list(class_names),
    )


def weak_label_config(config: TrainConfig, background_class: int | None) -> WeakLabelConfig:
    return WeakLabelConfig(
        kind=config.supervision,
        scribble_length=config.scribble_length,
        points_per_region=config.points_per_region,
        background_class=background_class,
        seed=config.seed,
    )


def prepare_training_data(config: TrainConfig, model: EmbeddingNet | None, contours: bool = True,
                          split: LoadedSplit | None = None):
    """Train split -> PreparedSet (weak labels, contours, cached features) + the split.

    contours=False skips the HED pass (for label banks, which need no relation V); pass an
    already loaded `split` to avoid reading (for VOC: decoding) the images twice."""
    split = split if split is not None else load_split(config.data, "train")
    needs_features = config.freeze_backbone or uses_cam_labels(config)
    prepared = prepare_set(
        split.samples,
        len(split.class_names),
        weak_label_config(config, split.background_class),
        model if needs_features else None,
        edge_source=config.edge_source if config.method == "spml" and contours else "none",
        contour_segments_per_image=config.contour_regions,
        progress=config.progress,
        contour_method=config.contour_method,
        contour_threshold=config.contour_threshold,
    )
    prepared = with_weak_cam_labels(prepared, config, split)
    if config.method == "partial_ce" and not bool((prepared.weak_labels != IGNORE_INDEX).any()):
        raise DatasetError("the weak labels label no pixel at all; check the supervision type")
    return prepared, split


def uses_cam_labels(config: TrainConfig) -> bool:
    """Tags always, boxes with box-CAM labels: both need the backbone features for a CAM."""
    return config.supervision == "tags" or (config.supervision == "boxes" and config.box_labels == "cam")


def with_weak_cam_labels(prepared: PreparedSet, config: TrainConfig, split: LoadedSplit) -> PreparedSet:
    """Replace the weak labels by CAM-derived ones where the supervision asks for it."""
    if config.supervision == "tags":
        return with_cam_labels(prepared, split.background_class, config.seed)
    if config.supervision == "boxes" and config.box_labels == "cam":
        weak_config = weak_label_config(config, split.background_class)
        _, _, boxes = weak_annotations(split.samples, len(split.class_names), weak_config)
        return with_box_cam_labels(prepared, boxes, split.background_class, config.seed,
                                   config.box_cam_window)
    return prepared


def train(config: TrainConfig, prepared: PreparedSet | None = None,
          class_names: list[str] | None = None) -> TrainResult:
    """Train and write OUT/checkpoint.pt. `prepared` (with `class_names`) lets a benchmark
    share one feature/edge cache between runs on the same images. Under torchrun every rank
    calls this; the result (global-batch loss and images/s) is the same on every rank."""
    torch.manual_seed(config.seed)
    with process_group(resolve_device(config.device)) as (world, device):
        return _train(config, prepared, class_names, world, device)


def _train(config: TrainConfig, prepared, class_names, world: World, device) -> TrainResult:
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, prepared = _build(config, device, prepared, class_names)
    replica = make_replica(model, world, device, from_features=config.freeze_backbone)
    optimizer = _optimizer(config, model)
    bank = MemoryBank(config.memory_batches)
    start_step = _maybe_resume(config, model, optimizer, bank, out_dir, device)
    loss_config = default_loss_config(config.supervision)
    loss_config.affinity.weight = config.affinity_weight
    loss_config.affinity_top_k = config.affinity_top_k
    loss_config.affinity_threshold = config.affinity_threshold
    metrics_path = out_dir / "train_log.jsonl"  # one JSON line per step: losses, lr, images/s
    if world.is_main:
        _truncate_metrics(metrics_path, start_step)
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               desc=f"train {config.method}/{config.supervision}",
               disable=not config.progress or not world.is_main)
    started, last_loss = time.perf_counter(), _logged_loss(metrics_path, start_step)
    for step in bar:
        _set_poly_lr(optimizer, config, step)
        terms = _train_step(config, replica, optimizer, prepared, bank, loss_config, step, device)
        last_loss = terms["loss"]
        bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
        if world.is_main:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps({"step": step + 1, **terms,
                                         "lr": optimizer.param_groups[0]["lr"]}) + "\n")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps and world.is_main:
            _save(config, model, optimizer, bank, step + 1, out_dir, label_bank=None)
    elapsed = time.perf_counter() - started
    steps_run = config.steps - start_step
    images_per_second = steps_run * config.batch_size * world.size / elapsed if elapsed > 0 else 0.0
    path, version = out_dir / CHECKPOINT_NAME, None
    if world.is_main:
        bank_result = _calibrated_label_bank(config, model, originals(prepared), device)
        path, version = _save(config, model, optimizer, bank, config.steps, out_dir, bank_result)
        plot_loss_curves(metrics_path, out_dir / "loss_curve.png")
        logger.info("trained %d steps at %.1f images/s; checkpoint %s (model version %s)",
                    steps_run, images_per_second, path, version)
    version = share_from_main(version, world)
    return TrainResult(path, version, last_loss, images_per_second, steps_run, world.rank)


def _calibrated_label_bank(config: TrainConfig, model: EmbeddingNet, prepared: PreparedSet, device):
    """The labelled training prototypes, with open-set thresholds from the held-out split."""
    bank = build_label_bank(model, prepared, config, device)
    kmeans = KMeansConfig(grid=tuple(config.inference_grid), iterations=config.kmeans_iterations)
    return calibrate_on_held_out(model, bank, config.data, kmeans, config.label_quantile, device,
                                 progress=config.progress)


def _build(config: TrainConfig, device: torch.device, prepared=None, class_names=None):
    split = None
    if class_names is None:
        split = load_split(config.data, "train")
        class_names = split.class_names
    torch.manual_seed(config.seed)
    model = EmbeddingNet(build_model_config(config, class_names)).to(device)
    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
        model.backbone.eval()
    if prepared is None:
        prepared, _ = prepare_training_data(config, model, split=split)
    prepared = with_views(prepared, config.views, model, progress=config.progress)
    if isinstance(model.head, ResidualHead):
        model.head.set_projection(
            hypercolumn_pixels(originals(prepared), model.head_channels, config.seed).to(device))
    return model, prepared


def hypercolumn_pixels(prepared: PreparedSet, channels: int, seed: int, count: int = 65536) -> torch.Tensor:
    """(count, C) hypercolumns of training pixels drawn with `seed` (padding excluded): what a
    residual head's PCA projection is fitted on."""
    if prepared.features is None:
        raise ValueError("a residual head needs cached features (a frozen backbone)")
    features = prepared.features[:, :channels]  # (N, C, h, w)
    pixels = features.permute(0, 2, 3, 1)[prepared.valid_mask()]  # (P, C)
    chosen = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return pixels[chosen].float()


def _optimizer(config: TrainConfig, model: EmbeddingNet) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")


def _set_poly_lr(optimizer, config: TrainConfig, step: int) -> None:
    """SPML's poly schedule: lr * (1 - step / steps) ** 0.9."""
    for group in optimizer.param_groups:
        group["lr"] = config.lr * (1 - step / config.steps) ** 0.9


def batch_indices(step: int, batch_size: int, num_images: int, seed: int) -> torch.Tensor:
    """Deterministic in (step, seed) alone, so a resumed run sees the same batches."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_images, positions % num_images
    orders = {int(e): torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 100003 + int(e)))
              for e in epochs.unique()}
    return torch.stack([orders[int(e)][o] for e, o in zip(epochs, offsets)])


def _train_step(config, replica: Replica, optimizer, prepared: PreparedSet, bank, loss_config, step,
                device):
    """One optimiser step on this rank's share of the global batch (all of it when alone)."""
    world = replica.world
    global_batch = batch_indices(step, config.batch_size * world.size, prepared.num_images, config.seed)
    global_batch = view_rows(global_batch, prepared.num_images, prepared.views, config.seed, step)
    index = rank_batch(global_batch, world)
    if config.freeze_backbone:
        inputs = prepared.features[index].to(device).float()
    else:
        replica.net.backbone.train()
        inputs = prepared.images[index].to(device).float()
    raw = replica.forward(inputs)
    if config.method == "spml":
        losses = _spml_losses(config, raw, prepared, index, global_batch, bank, loss_config, device,
                              step, world)
    else:
        losses = _ce_losses(config, replica.net, raw, prepared, index, device, world)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return average_floats({"loss": total.item(), **{k: v.item() for k, v in losses.items()}}, world)


def _ce_losses(config, net, raw, prepared, index, device, world: World):
    targets = prepared.weak_labels if config.method == "partial_ce" else prepared.dense_labels
    targets = targets[index].to(device)
    if not world.distributed:
        return {"CE": F.cross_entropy(net.logits(raw), targets, ignore_index=IGNORE_INDEX)}
    total = F.cross_entropy(net.logits(raw), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return global_mean({"CE": PixelSum(total, int((targets != IGNORE_INDEX).sum()))}, world)


def _spml_losses(config, raw, prepared, index, global_batch, bank, loss_config, device, step,
                 world: World):
    embeddings = F.normalize(raw, dim=1)
    kmeans = KMeansConfig(grid=tuple(config.train_grid), iterations=config.kmeans_iterations)
    valid = prepared.valid_mask(index).to(device)
    with torch.no_grad():
        clusters = masked_kmeans(embeddings.detach(), valid, kmeans)
    tags = prepared.tags[index].to(device)
    segments = build_training_segments(
        embeddings, clusters, prepared.contours[index].to(device), prepared.weak_labels[index].to(device),
        valid, location=config.lowlevel_location,
    )
    pixels = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
    # the pick is made over the global batch (the same on every rank); each rank keeps its share
    generator = torch.Generator().manual_seed(config.seed * 7919 + step)
    labelled = prepared.weak_labels[global_batch] != IGNORE_INDEX
    pick = pick_loss_pixels(prepared.valid_mask(global_batch), config.loss_pixels, generator, labelled,
                            config.loss_pixel_sampling)
    pick = rank_pixels(pick, pixels.shape[0], world).to(device)
    pixels, segments_seen = pixels[pick], segments.select_pixels(pick)
    banked = bank.concat(embeddings.shape[1], tags.shape[1], device)
    if not world.distributed:
        losses = relation_losses(pixels, segments_seen, tags, banked, loss_config)
        bank.push(segments, tags)
        return losses
    peers, everyone = gather_segments(segments, tags, world, with_grad=config.gather_prototypes)
    sums = relation_losses(pixels, segments_seen, tags, concat_entries(peers, banked), loss_config,
                           reduction="sum")
    bank.push_entry(everyone)
    return global_mean(sums, world)


def _logged_loss(metrics_path: Path, step: int) -> float:
    """The loss the log holds for `step` (a resumed run that has nothing left to train reports
    its last loss, not NaN); NaN when there is none."""
    if step == 0 or not metrics_path.exists():
        return float("nan")
    for line in reversed(metrics_path.read_text().splitlines()):
        row = json.loads(line)
        if row.get("step") == step:
            return float(row["loss"])
    return float("nan")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows up to the step we (re)start from: a killed run may have logged steps
    past its last checkpoint, which the resumed run will log again."""
    if not path.exists():
        return
    with open(path) as handle:
        rows = [line for line in handle if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as handle:
        handle.writelines(rows)


def _maybe_resume(config: TrainConfig, model, optimizer, bank, out_dir: Path, device) -> int:
    path = out_dir / CHECKPOINT_NAME
    if not config.resume or not path.exists():
        return 0
    checkpoint = load_checkpoint(path, expected=model.config)
    state = checkpoint.train_state
    _refuse_other_settings(config, state.get("train_config"), path)
    load_weights(model, checkpoint.state_dict)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    bank.load_state(state.get("memory_bank", []), device)
    step = int(state.get("step", 0))
    logger.info("resumed from %s at step %d", path, step)
    return min(step, config.steps)


# what may change between a run and its resumption: how it is run, not what it learns
RUN_CONTROL_FIELDS = ("out_dir", "steps", "checkpoint_every", "resume", "progress", "device")


def _refuse_other_settings(config: TrainConfig, stored: dict | None, path: Path) -> None:
    """Resuming under other settings (views, seed, supervision...) would silently continue a
    different run; refuse and name the settings. Fields added since `stored` was written take
    their defaults."""
    if stored is None:
        return
    before = TrainConfig.from_dict(stored).to_dict()
    now = config.to_dict()
    changed = sorted(k for k in now if k not in RUN_CONTROL_FIELDS and before.get(k) != now[k])
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(f"{path} was trained with other settings ({detail}); resume with the "
                              "same settings, or give another --out to start a new run")


def _save(config, model, optimizer, bank, step, out_dir: Path, label_bank):
    checkpoint = Checkpoint(
        config=model.config,
        state_dict=trainable_state_dict(model, config.freeze_backbone),
        label_bank=label_bank,
        method=config.method,
        train_state={"step": step, "optimizer": optimizer.state_dict(),
                     "memory_bank": bank.state(), "train_config": config.to_dict()},
    )
    path = out_dir / CHECKPOINT_NAME
    return path, save_checkpoint(checkpoint, path)
