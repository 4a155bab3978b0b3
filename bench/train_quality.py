"""Quality table: test mIoU of SPML vs partial-CE vs full supervision, per supervision type.

Runs on the built-in texture mosaic. Backbone features and HED contour regions of the
training images are computed once and shared by every run (they do not depend on the
supervision), so the whole default table trains on 2 CPU cores in well under 30 minutes.
Every row also carries the trivial baselines on the same segments (chance, colour
histogram, untrained backbone), as docs/architecture.md asks of every quality table.

    python bench/train_quality.py            # default size (CPU)
    python bench/train_quality.py --large    # bigger images/steps, for a GPU
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
from segsearch.trainer.evaluate import EvalConfig, evaluate_prepared
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
    """Features + contours of train, features of test: computed once for all runs."""
    train_split = load_split(base.data, "train")
    test_split = load_split(base.data, "test")
    feature_model = EmbeddingNet(build_model_config(base, train_split.class_names)).to(device).eval()
    started = time.perf_counter()
    train_set = prepare_set(train_split.samples, len(train_split.class_names),
                            WeakLabelConfig(kind="full"), feature_model, edge_source=base.edge_source,
                            contour_segments_per_image=base.contour_regions,
                            contour_method=base.contour_method, contour_threshold=base.contour_threshold)
    test_set = prepare_set(test_split.samples, len(train_split.class_names), WeakLabelConfig(kind="full"),
                           feature_model, edge_source="none")
    logging.info("shared features and edges in %.0f s", time.perf_counter() - started)
    return train_split, train_set, test_set


def with_supervision(train_set, train_split, config: TrainConfig):
    """A shallow copy of the shared set whose weak labels/tags follow `config.supervision`."""
    weak_config = weak_label_config(config, train_split.background_class)
    prepared = copy.copy(train_set)
    prepared.tags, prepared.weak_labels = weak_targets(
        train_split.samples, len(train_split.class_names), weak_config)
    return with_weak_cam_labels(prepared, config, train_split)


def run_one(base, method, supervision, prepared, test_set, class_names, out_root, device):
    config = copy.deepcopy(base)
    config.method, config.supervision = method, supervision
    config.out_dir = str(out_root / f"{method}-{supervision}")
    result = train(config, prepared, class_names)
    from segsearch.spml.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(result.checkpoint_path)
    model = checkpoint.build_model().to(device)
    kmeans = KMeansConfig(grid=tuple(config.inference_grid), iterations=config.kmeans_iterations)
    banks = {"model": checkpoint.label_bank}
    banks.update(build_label_banks(model, prepared, kmeans, device, ("colour_histogram", "backbone")))
    eval_config = EvalConfig(inference_grid=config.inference_grid, overlays=6)
    report, examples = evaluate_prepared(model, method, banks, test_set, class_names, eval_config, device)
    from segsearch.trainer.evaluate import write_report

    write_report(report, examples, test_set, Path(config.out_dir), checkpoint.model_version)
    return {name: s.miou for name, s in report.scores.items()}, result.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="default: the CPU table; large: bigger images and more steps (GPU)")
    parser.add_argument("--large", action="store_true", help="same as --size large")
    parser.add_argument("--steps", type=int, default=None, help="override training steps per run")
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
    device = resolve_device("auto")
    base = TrainConfig(
        data=DataConfig(image_size=size["image_size"], num_train=size["num_train"], num_test=size["num_test"]),
        steps=args.steps or size["steps"], progress=True, checkpoint_every=10**9,
        loss_pixel_sampling=args.loss_pixel_sampling, box_labels=args.box_labels,
        contour_method=args.contour_method, lowlevel_location=not args.no_lowlevel_location,
        seed=args.seed, views=args.views,
    )
    out_root = Path(args.out)
    started = time.perf_counter()
    train_split, train_set, test_set = shared_data(base, device)
    names = train_split.class_names
    rows, speeds = {}, {}
    methods = args.methods.split(",")
    nan = {"full_ce classifier": float("nan"), "partial_ce classifier": float("nan")}
    full_scores = nan
    if "full_ce" in methods:
        full_scores, speeds["full_ce"] = run_one(base, "full_ce", "full", with_supervision(
            train_set, train_split, _with(base, "full")), test_set, names, out_root, device)
    for supervision in args.supervisions.split(","):
        prepared = with_supervision(train_set, train_split, _with(base, supervision))
        spml = {"SPML k-NN": float("nan")}
        if "spml" in methods:
            spml, speeds["spml"] = run_one(base, "spml", supervision, prepared, test_set, names, out_root,
                                           device)
        partial = nan
        if "partial_ce" in methods:
            partial, speeds["partial_ce"] = run_one(base, "partial_ce", supervision, prepared, test_set,
                                                    names, out_root, device)
        if args.affinity_weight:
            with_a = copy.deepcopy(base)
            with_a.affinity_weight = args.affinity_weight
            with_a.out_dir = ""
            affinity, _ = run_one(with_a, "spml", supervision, prepared, test_set, names,
                                  out_root / "with_affinity", device)
        trivial = spml if "spml" in methods else partial  # every run scores the trivial baselines
        rows[supervision] = dict(
            spml_with_affinity=affinity["SPML k-NN"] if args.affinity_weight else None,
            spml=spml["SPML k-NN"], partial_ce=partial["partial_ce classifier"],
            full_ce=full_scores["full_ce classifier"], chance=trivial.get("chance", float("nan")),
            colour_histogram=trivial.get("colour_histogram k-NN", float("nan")),
            backbone=trivial.get("backbone k-NN", float("nan")),
        )
        print_table(rows, speeds, base, time.perf_counter() - started)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "table.json").write_text(json.dumps({"rows": rows, "images_per_second": speeds}, indent=1))


def _with(base: TrainConfig, supervision: str) -> TrainConfig:
    config = copy.deepcopy(base)
    config.supervision = supervision
    return config


def print_table(rows, speeds, base, seconds) -> None:
    print(f"\nTest mIoU (%) on the texture mosaic ({base.data.image_size}px, {base.data.num_train} train / "
          f"{base.data.num_test} test images, {base.steps} steps per run, frozen HED-VGG16 + trained head"
          f"{', views ' + base.views if base.views != 'none' else ''})")
    header = ["supervision", "SPML", "partial CE", "SPML - pCE", "full CE", "SPML / full",
              "chance", "colour hist", "backbone"]
    if any(r.get("spml_with_affinity") is not None for r in rows.values()):
        header.append("SPML + A")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        cells = [name, f"{100 * r['spml']:.1f}", f"{100 * r['partial_ce']:.1f}",
                 f"{100 * (r['spml'] - r['partial_ce']):+.1f}", f"{100 * r['full_ce']:.1f}",
                 f"{r['spml'] / r['full_ce']:.2f}", f"{100 * r['chance']:.1f}",
                 f"{100 * r['colour_histogram']:.1f}", f"{100 * r['backbone']:.1f}"]
        if r.get("spml_with_affinity") is not None:
            cells.append(f"{100 * r['spml_with_affinity']:.1f}")
        print("| " + " | ".join(cells) + " |")
    print("training images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items())
          + f"; wall time so far {seconds / 60:.1f} min\n")


if __name__ == "__main__":
    main()
