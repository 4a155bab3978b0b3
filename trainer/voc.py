"""Reader for PASCAL VOC 2012 (and its SBD-augmented masks) in the standard directory layout.

    root/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png        palette PNGs (VOC 2012)
      SegmentationClassAug/<id>.png     grey PNGs of class indices (SBD "aug" set, optional)
      ImageSets/Segmentation/<split>.txt

A list file holds one image id per line; the DeepLab style `"/JPEGImages/<id>.jpg
/SegmentationClassAug/<id>.png"` lines (e.g. `train_aug.txt`) are accepted too, the id being
the first path's stem. Masks come back as class indices 0..20 with 255 (object borders and
'difficult' objects) as ignore. Palette PNGs already store indices; RGB masks are mapped back
through the VOC colour map.
"""

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segsearch.errors import DatasetError
from segsearch.trainer.sample import IGNORE_INDEX, Sample

logger = logging.getLogger(__name__)

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")


def voc_colormap(count: int = 256) -> np.ndarray:
    """`(count, 3)` uint8: the VOC palette (bit-interleaved), index 255 is (224, 224, 192)."""
    colors = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        colors[index] = (red, green, blue)
    return colors


class VocDataset:
    """PASCAL VOC segmentation images and masks as `Sample`s.

    root: the folder that holds JPEGImages/ (e.g. `.../VOCdevkit/VOC2012`).
    split: list name under ImageSets/Segmentation (train, val, trainval, train_aug, ...).
    mask_dir: "SegmentationClassAug" or "SegmentationClass"; None picks Aug when it exists.
    image_set_file: a list file to use instead of ImageSets/Segmentation/<split>.txt.

    Every listed image and mask must exist (checked here, so that a broken tree fails before
    training starts); files that cannot be decoded fail when read, naming the file.
    """

    class_names: list[str] = list(VOC_CLASS_NAMES)

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        mask_dir: str | None = None,
        image_set_file: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        if not (self.root / "JPEGImages").is_dir():
            raise DatasetError(
                f"{self.root} is not a PASCAL VOC root (no JPEGImages/ folder): pass the folder that "
                f"holds JPEGImages/, SegmentationClass/ and ImageSets/, e.g. VOCdevkit/VOC2012"
            )
        self.mask_dir = self.root / self._pick_mask_dir(mask_dir)
        default_list = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        list_file = Path(image_set_file) if image_set_file else default_list
        self.image_ids = _read_image_list(list_file)
        self._check_files_exist()
        logger.info("VOC %s: %d images, masks from %s", list_file.name, len(self.image_ids), self.mask_dir.name)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Sample:
        image_id = self.image_ids[index]
        image_path, mask_path = self.image_path(image_id), self.mask_path(image_id)
        image = np.asarray(_open_image(image_path).convert("RGB"), dtype=np.uint8)
        mask = _mask_to_indices(_open_image(mask_path), mask_path)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                f"{image.shape[1]}x{image.shape[0]}: the two files do not belong together"
            )
        return Sample(image=image, mask=mask, image_id=image_id)

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"

    def _pick_mask_dir(self, mask_dir: str | None) -> str:
        if mask_dir is not None:
            if mask_dir not in MASK_DIRS:
                raise DatasetError(f"mask_dir must be one of {MASK_DIRS}, got {mask_dir!r}")
            if not (self.root / mask_dir).is_dir():
                raise DatasetError(f"mask folder {self.root / mask_dir} does not exist: check the VOC root or mask_dir")
            return mask_dir
        for candidate in MASK_DIRS:
            if (self.root / candidate).is_dir():
                return candidate
        raise DatasetError(
            f"{self.root} has neither SegmentationClassAug/ nor SegmentationClass/: "
            f"download the VOC 2012 segmentation masks (or SBD's SegmentationClassAug) into it"
        )

    def _check_files_exist(self) -> None:
        for image_id in self.image_ids:
            for path, kind in ((self.image_path(image_id), "image"), (self.mask_path(image_id), "mask")):
                if not path.is_file():
                    raise DatasetError(
                        f"{kind} {path} listed for id {image_id!r} is missing: restore it or drop the id from the list"
                    )


def _read_image_list(list_file: Path) -> list[str]:
    """Image ids from a VOC list file (plain ids or DeepLab 'image mask' path pairs)."""
    if not list_file.is_file():
        raise DatasetError(
            f"image list {list_file} not found: pick an existing split (train, val, trainval) or pass image_set_file"
        )
    ids = []
    for line in list_file.read_text().splitlines():
        fields = line.split()
        if fields:
            ids.append(Path(fields[0]).stem if "/" in fields[0] or "." in fields[0] else fields[0])
    if not ids:
        raise DatasetError(f"image list {list_file} is empty: it must name one image id per line")
    return ids


def _open_image(path: Path) -> Image.Image:
    """Decode a file fully now, so that corrupt files fail here with their name."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError as exc:
        raise DatasetError(f"{path} is missing: restore it or drop its id from the list") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path} cannot be decoded ({exc}): replace the corrupt file or drop its id") from exc


def _mask_to_indices(mask: Image.Image, path: Path) -> np.ndarray:
    """`(H, W)` int64 class indices from a palette, grey or RGB VOC mask."""
    if mask.mode in ("P", "L"):
        indices = np.asarray(mask, dtype=np.int64)
    elif mask.mode in ("RGB", "RGBA"):
        indices = _rgb_to_indices(np.asarray(mask.convert("RGB")), path)
    else:
        raise DatasetError(f"mask {path} has PIL mode {mask.mode}: expected a palette, grey or RGB PNG")
    bad = (indices >= len(VOC_CLASS_NAMES)) & (indices != IGNORE_INDEX)
    if bad.any():
        raise DatasetError(
            f"mask {path} holds values {np.unique(indices[bad])[:5].tolist()}: VOC masks hold 0..20 and 255 only"
        )
    return indices


def _rgb_to_indices(rgb: np.ndarray, path: Path) -> np.ndarray:
    colors = voc_colormap()
    known = list(range(len(VOC_CLASS_NAMES))) + [IGNORE_INDEX]
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    indices = np.full(codes.shape, -1, dtype=np.int64)
    for index in known:
        red, green, blue = (int(v) for v in colors[index])
        indices[codes == ((red << 16) | (green << 8) | blue)] = index
    if (indices < 0).any():
        raise DatasetError(f"mask {path} holds colours outside the VOC palette: save masks as palette PNGs")
    return indices
