"""Quality table: test mIoU of SPML vs partial-CE vs full supervision, per supervision type.

Runs on the built-in texture mosaic. Backbone features and HED contour regions of the
training images are computed once and shared by every run (they do not depend on the
supervision), so the whole default table trains on 2 CPU cores in well under 30 minutes.
Every row also carries the trivial baselines on the same segments (chance, colour
histogram, untrained backbone), as docs/architecture.md asks of every quality table.

    python bench/train_quality.py            # default size (CPU)
    python bench/train_quality.py --large    # bigger images/steps, for a GPU
    python bench/train_quality.py --steps 400,600,800   # each method's step count chosen on val

Every run is also scored on a validation split: new mosaics of the training band
(`load_split(..., "val")`), never trained on. With several `--steps`, each method trains once
per step count (the poly learning-rate schedule depends on it, so these are separate runs) and
the table reports the test mIoU of the step count whose *validation* mIoU is best, so no
setting is read off the test split. Run directories are `OUT/METHOD-SUPERVISION-STEPS`; a
finished or interrupted one is resumed, not retrained.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path


from segsearch.spml.embedding import EmbeddingNet
from segsearch.spml.kmeans import KMeansConfig
from segsearch.trainer.config import BOX_LABELS, TrainConfig
from segsearch.trainer.datasets import DataConfig, load_split
from segsearch.spml.checkpoint import load_checkpoint
from segsearch.trainer.evaluate import EvalConfig, evaluate_prepared, write_report
from segsearch.trainer.label_bank import build_label_banks
from segsearch.trainer.lowlevel import REGION_METHODS
from segsearch.spml.device import resolve_device
from segsearch.trainer.pixel_sampling import SAMPLING_RULES
from segsearch.trainer.prepared import prepare_set, weak_targets
from segsearch.trainer.train import build_model_config, train, weak_label_config, with_weak_cam_labels
from segsearch.trainer.views import VIEWS
from segsearch.trainer.weak_labels import WeakLabelConfig

SUPERVISIONS = ("tags", "boxes", "scribbles", "points")
SIZES = {
    "default": dict(image_size=128, num_train=240, num_test=60, steps=200),
    "large": dict(image_size=256, num_train=1000, num_test=200, steps=2000),
    "smoke": dict(image_size=64, num_train=16, num_test=8, steps=3),  # checks the script runs
}


def shared_data(base: TrainConfig, device):
    """Features + contours of train, features of val and test: computed once for all runs."""
    train_split = load_split(base.data, "train")
    feature_model = EmbeddingNet(build_model_config(base, train_split.class_names)).to(device).eval()
    started = time.perf_counter()
    train_set = prepare_set(train_split.samples, len(train_split.class_names),
                            WeakLabelConfig(kind="full"), feature_model, edge_source=base.edge_source,
                            contour_segments_per_image=base.contour_regions,
                            contour_method=base.contour_method, contour_threshold=base.contour_threshold)
    held_out = {name: prepare_set(load_split(base.data, name).samples, len(train_split.class_names),
                                  WeakLabelConfig(kind="full"), feature_model, edge_source="none")
                for name in ("val", "test")}
    logging.info("shared features and edges in %.0f s", time.perf_counter() - started)
    return train_split, train_set, held_out


def with_supervision(train_set, train_split, config: TrainConfig):
    """A shallow copy of the shared set whose weak labels/tags follow `config.supervision`."""
    weak_config = weak_label_config(config, train_split.background_class)
    prepared = copy.copy(train_set)
    prepared.tags, prepared.weak_labels = weak_targets(
        train_split.samples, len(train_split.class_names), weak_config)
    return with_weak_cam_labels(prepared, config, train_split)


OWN_SCORE = {"spml": "SPML k-NN", "partial_ce": "partial_ce classifier", "full_ce": "full_ce classifier"}


def run_one(base, method, supervision, steps, prepared, held_out, class_names, out_root, device):
    """Train (or resume) one run; its mIoU on val and test, and its training speed (None
    when nothing was left to train)."""
    config = copy.deepcopy(base)
    config.method, config.supervision, config.steps = method, supervision, steps
    config.out_dir = str(out_root / f"{method}-{supervision}-{steps}")
    result = train(config, prepared, class_names)
    checkpoint = load_checkpoint(result.checkpoint_path)
    model = checkpoint.build_model().to(device)
    kmeans = KMeansConfig(grid=tuple(config.inference_grid), iterations=config.kmeans_iterations)
    banks = {"model": checkpoint.label_bank}
    banks.update(build_label_banks(model, prepared, kmeans, device, ("colour_histogram", "backbone")))
    scores = {}
    for split, images in held_out.items():
        eval_config = EvalConfig(inference_grid=config.inference_grid, overlays=6 if split == "test" else 0)
        report, examples = evaluate_prepared(model, method, banks, images, class_names, eval_config, device)
        if split == "test":
            write_report(report, examples, images, Path(config.out_dir), checkpoint.model_version)
        scores[split] = {name: s.miou for name, s in report.scores.items()}
    return scores, (result.images_per_second if result.steps else None)


def chosen_on_val(method, supervision, step_counts, run) -> dict:
    """Run `method` at every step count; the scores of the one with the best val mIoU."""
    runs = {steps: run(method, supervision, steps) for steps in step_counts}
    best = max(step_counts, key=lambda steps: runs[steps][0]["val"][OWN_SCORE[method]])
    curve = {steps: {split: scores[OWN_SCORE[method]] for split, scores in runs[steps][0].items()}
             for steps in step_counts}
    speeds = [speed for _, speed in runs.values() if speed is not None]
    return dict(steps=best, test=runs[best][0]["test"], curve=curve, speed=speeds[-1] if speeds else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="default: the CPU table; large: bigger images and more steps (GPU)")
    parser.add_argument("--large", action="store_true", help="same as --size large")
    parser.add_argument("--steps", default=None,
                        help="training steps per run; several (comma-separated) = one run each, the "
                             "table reporting each method at the count whose val mIoU is best")
    parser.add_argument("--out", default="bench/out/train_quality", help="run directories and table.json")
    parser.add_argument("--supervisions", default=",".join(SUPERVISIONS), help="comma-separated subset")
    parser.add_argument("--methods", default="spml,partial_ce,full_ce",
                        help="comma-separated subset of the methods to train")
    parser.add_argument("--affinity-weight", type=float, default=0.0,
                        help="also train SPML with relation A at this weight, per supervision, "
                             "and report it beside plain SPML (0 = skip)")
    d = TrainConfig()
    parser.add_argument("--loss-pixel-sampling", choices=SAMPLING_RULES, default=d.loss_pixel_sampling,
                        help="which pixels enter the SPML loss (see trainer/pixel_sampling.py)")
    parser.add_argument("--box-labels", choices=BOX_LABELS, default=d.box_labels,
                        help="boxes: cam (SPML's in-box CAM >= 0.5) or dense (whole box painted)")
    parser.add_argument("--contour-method", choices=REGION_METHODS, default=d.contour_method,
                        help="relation V's regions (see trainer/lowlevel.py)")
    parser.add_argument("--no-lowlevel-location", action="store_true",
                        help="relation V without SPML's (y, x) location features")
    parser.add_argument("--views", choices=VIEWS, default=d.views,
                        help="training views (TrainConfig.views, trainer/views.py): flip adds each "
                             "training image's mirror, features cached once, one view drawn per step")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of weights, batches and weak labels (TrainConfig.seed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    size = SIZES["large" if args.large else args.size]
    step_counts = [int(v) for v in args.steps.split(",")] if args.steps else [size["steps"]]
    device = resolve_device("auto")
    base = TrainConfig(
        data=DataConfig(image_size=size["image_size"], num_train=size["num_train"], num_test=size["num_test"],
                        num_val=size["num_test"]),
        steps=step_counts[0], progress=True, checkpoint_every=100, resume=True,
        loss_pixel_sampling=args.loss_pixel_sampling, box_labels=args.box_labels,
        contour_method=args.contour_method, lowlevel_location=not args.no_lowlevel_location,
        seed=args.seed, views=args.views,
    )
    out_root = Path(args.out)
    started = time.perf_counter()
    train_split, train_set, held_out = shared_data(base, device)
    names = train_split.class_names
    rows, curves, speeds = {}, {}, {}
    methods = args.methods.split(",")

    def run_for(config_base, root):
        prepared = {}  # supervision -> its weak labels (tags and boxes: CAMs), made once for every run

        def run(method, supervision, steps):
            if supervision not in prepared:
                prepared[supervision] = with_supervision(train_set, train_split, _with(config_base, supervision))
            return run_one(config_base, method, supervision, steps, prepared[supervision], held_out, names,
                           root, device)
        return run

    run = run_for(base, out_root)
    full = chosen_on_val("full_ce", "full", step_counts, run) if "full_ce" in methods else None
    for supervision in args.supervisions.split(","):
        chosen = {m: chosen_on_val(m, supervision, step_counts, run) for m in ("spml", "partial_ce") if m in methods}
        if full:
            chosen["full_ce"] = full
        if args.affinity_weight:
            with_a = copy.deepcopy(base)
            with_a.affinity_weight = args.affinity_weight
            chosen["spml_with_affinity"] = chosen_on_val("spml", supervision, step_counts,
                                                         run_for(with_a, out_root / "with_affinity"))
        rows[supervision] = table_row(chosen)
        curves[supervision] = {m: c["curve"] for m, c in chosen.items()}
        speeds.update({m: c["speed"] for m, c in chosen.items() if c["speed"] is not None})
        print_table(rows, speeds, base, step_counts, time.perf_counter() - started)
        print_curves(curves)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "table.json").write_text(json.dumps(
        {"rows": rows, "val_and_test_by_steps": curves, "images_per_second": speeds}, indent=1))


def table_row(chosen: dict) -> dict:
    """Each method's test mIoU at its val-chosen step count, with the trivial baselines of the
    SPML run (else the partial CE run): every run scores them on its own segments."""
    nan = float("nan")
    own = {m: (c["test"][OWN_SCORE["spml" if m == "spml_with_affinity" else m]], c["steps"])
           for m, c in chosen.items()}
    trivial = (chosen.get("spml") or chosen.get("partial_ce") or {"test": {}})["test"]
    row = {m: own.get(m, (nan, None))[0] for m in ("spml", "partial_ce", "full_ce")}
    row.update(steps={m: steps for m, (_, steps) in own.items()},
               spml_with_affinity=own["spml_with_affinity"][0] if "spml_with_affinity" in own else None,
               chance=trivial.get("chance", nan), colour_histogram=trivial.get("colour_histogram k-NN", nan),
               backbone=trivial.get("backbone k-NN", nan))
    return row


def _with(base: TrainConfig, supervision: str) -> TrainConfig:
    config = copy.deepcopy(base)
    config.supervision = supervision
    return config


def print_table(rows, speeds, base, step_counts, seconds) -> None:
    counts = "/".join(str(n) for n in step_counts)
    chosen = ", the step count of each run chosen on val" if len(step_counts) > 1 else ""
    print(f"\nTest mIoU (%) on the texture mosaic ({base.data.image_size}px, {base.data.num_train} train / "
          f"{base.data.num_val} val / {base.data.num_test} test images, {counts} steps per run{chosen}, "
          f"frozen HED-VGG16 + trained head{', views ' + base.views if base.views != 'none' else ''})")
    header = ["supervision", "SPML", "partial CE", "SPML - pCE", "full CE", "SPML / full",
              "chance", "colour hist", "backbone", "steps (SPML, pCE, full)"]
    if any(r.get("spml_with_affinity") is not None for r in rows.values()):
        header.append("SPML + A")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        steps = ", ".join(str(r["steps"].get(m, "-")) for m in ("spml", "partial_ce", "full_ce"))
        cells = [name, f"{100 * r['spml']:.1f}", f"{100 * r['partial_ce']:.1f}",
                 f"{100 * (r['spml'] - r['partial_ce']):+.1f}", f"{100 * r['full_ce']:.1f}",
                 f"{r['spml'] / r['full_ce']:.2f}", f"{100 * r['chance']:.1f}",
                 f"{100 * r['colour_histogram']:.1f}", f"{100 * r['backbone']:.1f}", steps]
        if r.get("spml_with_affinity") is not None:
            cells.append(f"{100 * r['spml_with_affinity']:.1f}")
        print("| " + " | ".join(cells) + " |")
    print("training images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items())
          + f"; wall time so far {seconds / 60:.1f} min\n")


def print_curves(curves) -> None:
    """Val and test mIoU of every run: how the choice was made, and whether val tracks test."""
    print("| supervision | method | steps | val mIoU | test mIoU |\n|---|---|---:|---:|---:|")
    for supervision, by_method in curves.items():
        for method, by_steps in by_method.items():
            for steps, scores in by_steps.items():
                print(f"| {supervision} | {method} | {steps} | {100 * scores['val']:.1f} | "
                      f"{100 * scores['test']:.1f} |")
    print()


if __name__ == "__main__":
    main()
