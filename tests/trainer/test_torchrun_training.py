"""Data-parallel training: 2 gloo processes launched by the real torchrun on loopback take the
same step as one process on the doubled batch; only rank 0 writes; resume stays exact."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segsearch.spml.checkpoint import load_checkpoint
from segsearch.spml.embedding import EmbeddingNet
from segsearch.trainer.config import TrainConfig
from segsearch.trainer.datasets import DataConfig
from segsearch.trainer.ddp import World, rank_batch, rank_pixels
from segsearch.trainer.loss import segsort_loss
from segsearch.trainer.train import batch_indices, train
from segsearch.trainer.views import view_rows

PER_RANK_BATCH = 2
# SGD, not Adam: Adam's first step is about lr * sign(gradient), blind to a wrongly scaled
# gradient; SGD's step is proportional to it.
CLI_FLAGS = ["--backbone", "small", "--edge-source", "sobel", "--image-size", "64", "--num-train", "8",
             "--num-test", "4", "--data-seed", "3", "--optimizer", "sgd", "--lr", "0.5",
             "--inference-grid", "4x4", "--no-progress"]
DATA = DataConfig(image_size=64, num_train=8, num_test=4, seed=3)
ATOL = 1e-5

# Runs the real `python -m segsearch.trainer` under torchrun, recording every file this rank
# opens for writing inside the run directory (Python audit hooks see each open()).
AUDITED_TRAINER = textwrap.dedent('''
    import atexit, json, os, runpy, sys
    out_dir = os.path.abspath(os.environ["AUDIT_OUT_DIR"]) + os.sep
    written = set()

    def hook(event, args):
        if event != "open" or isinstance(args[0], int):
            return
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        path = os.path.abspath(os.fsdecode(os.fspath(path)))
        if writing and path.startswith(out_dir):
            written.add(os.path.relpath(path, out_dir))

    def report():
        with open(os.path.join(os.environ["AUDIT_LOG_DIR"], "rank%s.json" % os.environ["RANK"]), "w") as f:
            json.dump(sorted(written), f)

    sys.addaudithook(hook)
    atexit.register(report)
    sys.argv = ["segsearch.trainer", *sys.argv[1:]]
    runpy.run_module("segsearch.trainer", run_name="__main__", alter_sys=True)
''')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(script_args: list[str], env_extra: dict | None = None, timeout: float = 120) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *script_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _two_ranks(out_dir: Path, *extra: str) -> None:
    _torchrun(["-m", "segsearch.trainer", "train", "--out", str(out_dir),
               "--batch-size", str(PER_RANK_BATCH), *CLI_FLAGS, *extra])


def _one_process(out_dir: Path, **overrides) -> None:
    """The same flags as CLI_FLAGS, in-process, on the doubled batch."""
    values = dict(out_dir=str(out_dir), backbone="small", pretrained=False, edge_source="sobel", data=DATA,
                  optimizer="sgd", lr=0.5, inference_grid=(4, 4), progress=False,
                  batch_size=2 * PER_RANK_BATCH, steps=1)
    values.update(overrides)
    train(TrainConfig(**values))


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out_dir / "checkpoint.pt").state_dict


def _losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out_dir / "train_log.jsonl")]


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def first_step(tmp_path_factory):
    """(one-process dir, two-rank dir, {rank: files it wrote}) after one step each."""
    root = tmp_path_factory.mktemp("ddp")
    launcher, logs = root / "audited_trainer.py", root / "writes"
    launcher.write_text(AUDITED_TRAINER)
    logs.mkdir()
    two = root / "two"
    _torchrun([str(launcher), "train", "--out", str(two), "--batch-size", str(PER_RANK_BATCH), "--steps", "1",
               *CLI_FLAGS],
              env_extra={"AUDIT_OUT_DIR": str(two), "AUDIT_LOG_DIR": str(logs)})
    _one_process(root / "one")
    writes = {rank: json.loads((logs / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    return root / "one", two, writes


def test_two_ranks_take_the_one_process_step_on_the_doubled_batch(first_step):
    one, two, _ = first_step
    one_weights, two_weights = _weights(one), _weights(two)
    torch.manual_seed(0)  # the run's seed: the weights before the step
    initial = EmbeddingNet(load_checkpoint(one / "checkpoint.pt").config).state_dict()
    assert _max_difference(one_weights, initial) > 100 * ATOL  # the step moved the weights
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], atol=ATOL, rtol=0)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)


def test_only_rank_0_writes(first_step):
    _, two, writes = first_step
    assert writes[1] == []
    assert {"train_log.jsonl", "loss_curve.png"} <= set(writes[0])
    assert any(name.startswith(".checkpoint.pt.tmp-") for name in writes[0])  # durable.atomic_write
    assert len(_losses(two)) == 1


def test_resume_continues_like_one_process(first_step, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(first_step[0], one)
    shutil.copytree(first_step[1], two)
    _two_ranks(two, "--steps", "2", "--resume")  # step 2 also contrasts with the restored bank
    _one_process(one, steps=2, resume=True)
    assert len(_losses(two)) == 2
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert _max_difference(_weights(two), _weights(one)) < ATOL


def test_flip_views_take_the_one_process_step(first_step, tmp_path):
    """The view draw is made over the global batch from (seed, step): both ranks agree on it,
    so with --views flip two ranks still take the one-process step on the doubled batch."""
    rows = view_rows(batch_indices(0, 2 * PER_RANK_BATCH, 8, seed=0), 8, 2, seed=0, step=0)
    assert (rows >= 8).any() and (rows < 8).any()  # step 0 mixes originals and mirrors
    _two_ranks(tmp_path / "two", "--steps", "1", "--views", "flip")
    _one_process(tmp_path / "one", views="flip")
    assert _max_difference(_weights(tmp_path / "one"), _weights(first_step[0])) > 100 * ATOL
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert _max_difference(_weights(tmp_path / "two"), _weights(tmp_path / "one")) < ATOL


@pytest.mark.slow
def test_without_gathered_prototypes_the_step_differs(first_step, tmp_path):
    """Each rank contrasting with its own segments only is not the doubled-batch step."""
    _two_ranks(tmp_path / "local", "--steps", "1", "--no-gather-prototypes")
    assert _max_difference(_weights(tmp_path / "local"), _weights(first_step[0])) > 100 * ATOL


def test_ranks_split_every_global_batch_disjointly():
    for step in range(3):
        global_batch = batch_indices(step, 6, 10, seed=2)
        parts = [rank_batch(global_batch, World(rank=r, size=3)) for r in range(3)]
        assert torch.cat(parts).tolist() == global_batch.tolist()
    assert rank_batch(global_batch, World()).tolist() == global_batch.tolist()


def test_ranks_split_the_loss_pixel_sample():
    pick = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:15]
    shares = [rank_pixels(pick, 10, World(rank=r, size=4)) for r in range(4)]
    assert all(bool(((s >= 0) & (s < 10)).all()) for s in shares)
    assert sorted(v for r, share in enumerate(shares) for v in (share + 10 * r).tolist()) == sorted(pick.tolist())


def test_summed_loss_over_its_pixel_count_is_the_mean():
    torch.manual_seed(0)
    embeddings, prototypes = F.normalize(torch.randn(30, 8), dim=1), F.normalize(torch.randn(7, 8), dim=1)
    positive = torch.rand(30, 7) < 0.3
    positive[:4] = False  # pixels without a positive do not count
    negative = ~positive
    mean = segsort_loss(embeddings, prototypes, positive, negative, 5.0)
    summed = segsort_loss(embeddings, prototypes, positive, negative, 5.0, reduction="sum")
    assert summed.count == int(positive.any(dim=1).sum())
    assert float(summed.total / summed.count) == pytest.approx(float(mean), rel=1e-6)
