"""Data-parallel SPML training over torch.distributed, launched by torchrun.

    torchrun --nproc-per-node N -m segsearch.trainer train FLAGS...

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `process_group`
joins that group (NCCL when training on CUDA, gloo on CPU) and otherwise leaves a
one-process `World`, so a plain `segsearch train` runs exactly the single-process code.

The conventions, and why:

- Batches. `--batch-size` is per process; the global batch is batch_size x world_size.
  Rank r takes rows [r*B, (r+1)*B) of the global batch that one process would draw with
  batch size B*W (`rank_batch`), so W processes take the same step as one process on the
  W-times larger batch. `--loss-pixels` counts pixels of the *global* batch for the same
  reason: every rank draws the same global sample and keeps the pixels of its own images.
- Prototypes. SPML contrasts each pixel with every segment of the batch (relations C, O,
  A). Each rank gathers the other ranks' segment prototypes, labels and tags
  (`gather_segments`); the prototypes keep their gradient (`_GatherRows`: all-gather
  forward, all-reduce-sum backward), so a rank's segments are also trained by the other
  ranks' pixels, as in one process. Relation V only pairs segments of one image: local.
- Loss. Each rank divides its pixels' loss *sum* by the global pixel count and multiplies
  by W (`global_mean`): DDP averages gradients over ranks, and the average of W * (local
  sum / global count) is the gradient of the global batch's mean.
- Memory bank. Every rank pushes the whole global batch's segments (in rank order), so all
  banks stay identical and rank 0's checkpoint resumes every rank exactly.
- I/O. Only rank 0 writes metrics, curves and checkpoints; all ranks read one on resume
  (the run directory must be shared when ranks span machines).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from segsearch.errors import SegsearchError
from segsearch.spml.embedding import EmbeddingNet
from segsearch.trainer.loss import PixelSum
from segsearch.trainer.relations import BankEntry
from segsearch.trainer.training_segments import TrainingSegments

logger = logging.getLogger(__name__)


class DistributedSetupError(SegsearchError):
    """The torchrun environment and the requested device do not fit together."""


@dataclass(frozen=True)
class World:
    """This process's place in the group; the default is a lone process.

    device: where collectives' small bookkeeping tensors live (CPU for gloo, the rank's
    GPU for NCCL, which only moves CUDA tensors).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} is not an integer; launch with torchrun") from None


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """Join torchrun's process group for training on `device`; yield (world, device).

    On CUDA each rank takes GPU LOCAL_RANK. Destroys the group on exit only if it created
    it (a caller may have initialised one itself, e.g. a test)."""
    size = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    if size <= 1:
        yield World(device=torch.device("cpu")), device
        return
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _rank_device(device, local_rank)
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    world = World(dist.get_rank(), dist.get_world_size(), local_rank,
                  device if dist.get_backend() == "nccl" else torch.device("cpu"))
    logger.info("rank %d of %d (%s) training on %s", world.rank, world.size, dist.get_backend(), device)
    try:
        yield world, device
    finally:
        if created:
            dist.destroy_process_group()


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise DistributedSetupError(
            f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
            "use --nproc-per-node at most the number of GPUs, or --device cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class TrainForward(nn.Module):
    """The step's differentiable forward as one module call: inputs -> raw embeddings.

    Why a module: DDP prepares its gradient all-reduce inside forward(), while a step needs
    raw (not normalised) embeddings, from cached features when the backbone is frozen
    (inputs (B, C, h, w)) or from images otherwise (inputs (B, 3, H, W))."""

    def __init__(self, net: EmbeddingNet, from_features: bool):
        super().__init__()
        self.net = net
        self.from_features = from_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = inputs if self.from_features else self.net.features(inputs)
        return self.net.raw_embeddings(features)


@dataclass
class Replica:
    """One process's model: the network (saved, evaluated), the forward that the step calls
    (DDP-wrapped when there are several processes) and the group it trains in."""

    net: EmbeddingNet
    forward: nn.Module
    world: World


def make_replica(net: EmbeddingNet, world: World, device: torch.device, from_features: bool) -> Replica:
    forward = TrainForward(net, from_features)
    if world.distributed:
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    return Replica(net, forward, world)


def rank_batch(global_batch: torch.Tensor, world: World) -> torch.Tensor:
    """The distributed sampler: this rank's disjoint slice of the global batch, (B*W,) -> (B,)."""
    per_rank = global_batch.shape[0] // world.size
    return global_batch[world.rank * per_rank:(world.rank + 1) * per_rank]


def rank_pixels(global_pick: torch.Tensor, num_local: int, world: World) -> torch.Tensor:
    """Global pixel ids (rank-major: rank r owns [r*num_local, (r+1)*num_local)) -> this
    rank's share as local ids, in the global pick's order."""
    start = world.rank * num_local
    mine = global_pick[(global_pick >= start) & (global_pick < start + num_local)]
    return mine - start


def row_counts(rows: int, world: World) -> list[int]:
    """Every rank's row count of a tensor to gather (gathers need equal shapes: we pad)."""
    counts = [torch.zeros(1, dtype=torch.long, device=world.device) for _ in range(world.size)]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=world.device))
    return [int(count) for count in counts]


def gather_rows(local: torch.Tensor, counts: list[int], world: World) -> torch.Tensor:
    """(counts[rank], ...) on every rank -> (sum(counts), ...) in rank order, no gradient."""
    source = local.to(world.device)
    padded = source.new_zeros((max(counts), *source.shape[1:]))
    padded[: source.shape[0]] = source
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(local.device)


class _GatherRows(torch.autograd.Function):
    """gather_rows with gradient: backward sums every rank's gradient for the gathered rows
    (all-reduce) and hands each rank the rows it contributed."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: list[int], world: World) -> torch.Tensor:
        ctx.counts, ctx.world = counts, world
        return gather_rows(local, counts, world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = grad.to(ctx.world.device).contiguous().clone()
        dist.all_reduce(summed)
        start = sum(ctx.counts[: ctx.world.rank])
        return summed[start:start + ctx.counts[ctx.world.rank]].to(grad.device), None, None


def gather_rows_with_grad(local: torch.Tensor, counts: list[int], world: World) -> torch.Tensor:
    return _GatherRows.apply(local, counts, world)


def gather_segments(segments: TrainingSegments, image_tags: torch.Tensor, world: World,
                    with_grad: bool = True) -> tuple[BankEntry, BankEntry]:
    """All ranks' segments of the global batch -> (peers, everyone).

    peers: the *other* ranks' segments, prototypes (S_other, D) carrying gradient (empty
    when `with_grad` is False: then each rank contrasts against its own segments only).
    everyone: all ranks' segments in rank order, detached, for the memory bank.
    image_tags: (B, C) bool, this rank's images."""
    counts = row_counts(segments.num_segments, world)
    labels = gather_rows(segments.segment_label, counts, world)
    tags = gather_rows(image_tags[segments.segment_image].to(torch.uint8), counts, world).bool()
    if with_grad:
        prototypes = gather_rows_with_grad(segments.prototypes, counts, world)
    else:
        prototypes = gather_rows(segments.prototypes.detach(), counts, world)
    everyone = BankEntry(prototypes.detach(), labels, tags)
    others = torch.ones(sum(counts), dtype=torch.bool, device=labels.device)
    if with_grad:
        start = sum(counts[: world.rank])
        others[start:start + counts[world.rank]] = False
    else:
        others[:] = False  # no peers: contrast against this rank's segments (and the bank)
    return BankEntry(prototypes[others], labels[others], tags[others]), everyone


def concat_entries(first: BankEntry, second: BankEntry) -> BankEntry:
    return BankEntry(torch.cat([first.prototypes, second.prototypes]),
                     torch.cat([first.labels, second.labels]), torch.cat([first.tags, second.tags]))


def global_mean(terms: dict[str, PixelSum], world: World) -> dict[str, torch.Tensor]:
    """Per-term W * (local sum / global pixel count): DDP's gradient average over ranks then
    equals the gradient of the mean over the whole global batch. A term no pixel of the
    global batch takes part in is zero (as the single-process loss is)."""
    counts = torch.tensor([float(term.count) for term in terms.values()], dtype=torch.float64,
                          device=world.device)
    dist.all_reduce(counts)
    return {name: term.total * (world.size / max(float(count), 1.0))
            for (name, term), count in zip(terms.items(), counts.tolist())}


def average_floats(values: dict[str, float], world: World) -> dict[str, float]:
    """Mean over ranks of per-rank numbers (the logged loss terms: each rank's term is its
    share scaled by W, so the mean is the global batch's loss)."""
    if not world.distributed:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=world.device)
    dist.all_reduce(stacked)
    return {name: value / world.size for name, value in zip(values, stacked.tolist())}


def share_from_main(value, world: World):
    """Rank 0's `value` on every rank (e.g. the checkpoint's model version); also makes the
    other ranks wait until rank 0 has written what `value` describes."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
