"""`segsearch demo`: the main job end to end on embedded defaults.

Trains SPML on the built-in texture mosaic with scribbles (frozen HED-VGG16 backbone,
features cached), then evaluates it beside the baselines and writes the pictures.
"""
from __future__ import annotations

from pathlib import Path


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train + evaluate on the built-in mosaic, end to end",
                              description="Train SPML on the built-in texture mosaic with scribble "
                              "supervision, evaluate it, and write everything under WORKDIR.")
    p.add_argument("--workdir", default="segsearch-demo", help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default: %(default)s)")
    p.add_argument("--supervision", default="scribbles",
                   choices=("tags", "boxes", "scribbles", "points"), help="(default: %(default)s)")
    p.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    from segsearch.trainer.config import TrainConfig
    from segsearch.trainer.datasets import DataConfig
    from segsearch.trainer.evaluate import EvalConfig, evaluate_checkpoint
    from segsearch.trainer.train import train

    workdir = Path(args.workdir)
    run_dir = workdir / f"spml-{args.supervision}"
    result = train(TrainConfig(out_dir=str(run_dir), supervision=args.supervision,
                               steps=args.steps, data=DataConfig()))
    report = evaluate_checkpoint(EvalConfig(checkpoint=str(result.checkpoint_path)))
    print(report.summary())
    print(f"\nrun directory: {run_dir}\n  checkpoint.pt  loss_curve.png  metrics.jsonl  "
          f"eval.json  eval_overlays.png")
    return 0
