"""Typed configuration of a training run and of an evaluation (their fields are the flags of
`segsearch train` and `segsearch eval`, which take their defaults from here)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from segsearch.spml.config import INFERENCE_GRID, TRAIN_GRID, KMeansConfig, SegmenterConfig
from segsearch.trainer.datasets import DataConfig
from segsearch.trainer.lowlevel import DEFAULT_THRESHOLD, REGION_METHODS
from segsearch.trainer.pixel_sampling import SAMPLING_RULES
from segsearch.trainer.views import VIEWS

METHODS = ("spml", "partial_ce", "full_ce")
BOX_LABELS = ("cam", "dense")


@dataclass
class TrainConfig:
    out_dir: str = "runs/spml"
    method: str = "spml"  # spml | partial_ce (weak labels only) | full_ce (every pixel)
    supervision: str = "scribbles"  # tags | boxes | scribbles | points | full
    data: DataConfig = field(default_factory=DataConfig)
    backbone: str = "vgg16"
    pretrained: bool = True
    freeze_backbone: bool = True
    embedding_dim: int = 64
    hidden_dim: int = 128
    feature_blocks: tuple[int, ...] = (3, 4, 5)  # backbone blocks in the hypercolumn
    block_norm: bool = False  # L2-normalise each block per pixel (spml/embedding.py)
    colour_bins: int = 0  # > 0: append a soft Lab colour code of colour_bins^3 bins
    colour_weight: float = 0.0  # its share of the embedding's squared norm
    head_type: str = "mlp"  # "mlp" or "residual" (PCA projection + learned correction)
    # "flip": each step draws, per image, the original or its cached mirror (trainer/views.py)
    views: str = "none"
    steps: int = 300
    batch_size: int = 8  # per process; under torchrun the global batch is batch_size x ranks
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    train_grid: tuple[int, int] = TRAIN_GRID
    inference_grid: tuple[int, int] = INFERENCE_GRID
    kmeans_iterations: int = KMeansConfig.iterations
    scribble_length: float = 1.0
    points_per_region: int = 1
    edge_source: str = "hed"  # hed | sobel
    contour_regions: int = 16  # V: at most this many contour regions per image (grid: about this many)
    # V's regions: "grid" = grid-seeded compact watershed cells; "hierarchy" = cut of the image's
    # contour hierarchy (UCM-like, image-adaptive; trainer/lowlevel.py). Grid stays the default:
    # the hierarchy scored 0.8-0.9 mIoU lower on the mosaic (bench/RESULTS.md, "Relation V ...")
    contour_method: str = "grid"
    contour_threshold: float = DEFAULT_THRESHOLD  # hierarchy: borders of mean edge strength above this stay
    # V on embeddings and prototypes concatenated with the pixel's (y, x), as SPML does
    lowlevel_location: bool = True
    # unlabelled pixels drawn per step for the loss (0 = all); labelled pixels are all kept
    loss_pixels: int = 2048
    loss_pixel_sampling: str = "keep_labelled"  # keep_labelled | uniform (see pixel_sampling.py)
    # boxes: "cam" = SPML's box-CAM labels (in-box CAM >= 0.5), "dense" = the whole box painted
    box_labels: str = "cam"
    box_cam_window: int = 5  # box-CAM averaged over this many stride-4 cells (see cam.smooth_cams)
    affinity_weight: float = 0.0  # the A relation; off as in SPML's released configs
    affinity_top_k: int = 3  # A: labelled neighbours an unlabelled segment borrows labels from
    affinity_threshold: float = 0.95  # A: minimum cosine similarity of such a neighbour (SPML)
    memory_batches: int = 2
    # the label bank's open-set thresholds sit at this quantile of the held-out split's nearest
    # similarity and vote share (trainer/label_calibration.py); 0 = no thresholds, every
    # segment gets a label
    label_quantile: float = 0.05
    # under torchrun: contrast against every rank's segments (False: each rank's own only)
    gather_prototypes: bool = True
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.loss_pixel_sampling not in SAMPLING_RULES:
            raise ValueError(f"loss_pixel_sampling must be one of {SAMPLING_RULES}, "
                             f"got {self.loss_pixel_sampling!r}")
        if self.contour_method not in REGION_METHODS:
            raise ValueError(f"contour_method must be one of {REGION_METHODS}, got {self.contour_method!r}")
        if self.views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {self.views!r}")
        if self.box_labels not in BOX_LABELS:
            raise ValueError(f"box_labels must be one of {BOX_LABELS}, got {self.box_labels!r}")
        if not 0.0 <= self.label_quantile < 1.0:
            raise ValueError(f"label_quantile must lie in [0, 1), got {self.label_quantile}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        values["data"] = DataConfig(**values.get("data", {}))
        for name in ("train_grid", "inference_grid", "feature_blocks"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


@dataclass
class EvalConfig:
    checkpoint: str = "runs/spml/checkpoint.pt"
    out_dir: str = ""  # default: the checkpoint's directory
    data: DataConfig | None = None  # default: the data the checkpoint was trained on
    inference_grid: tuple[int, int] = INFERENCE_GRID
    kmeans_iterations: int = KMeansConfig.iterations
    k: int = SegmenterConfig.knn_k  # neighbours in the k-NN vote, as the indexer votes
    baselines: bool = True
    overlays: int = 6
    device: str = "auto"
    seed: int = 0
    progress: bool = True
