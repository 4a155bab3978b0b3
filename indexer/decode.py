"""Read and decode one corpus image safely: bytes -> sha256 -> RGB `(H, W, 3)` uint8, bounded.

Why so careful: a corpus is data from elsewhere. One bad file must cost one line in the skip
report, never the job, so `decode_file` never raises: every failure comes back as a
`SkippedImage` with a typed `SkipReason` and a human-readable detail.

Steps (each failure mapped to a reason):
1. read the bytes (`unreadable`: missing, a folder, no permission; `empty_file`: 0 bytes);
2. sha256 of the bytes (the store's dedup key: re-indexing the same content adds nothing);
3. `PIL.Image.open`, restricted to `PIL_FORMATS`, reads only the header (`not_an_image`:
   not one of those formats, e.g. a text file named `.png`; `corrupt` if the file starts with an image signature but its header is
   damaged);
4. pixel guard on the header size before any decoding (`too_many_pixels`): refused when
   `width * height > DecodeConfig.max_pixels`. PIL's own process-wide guard
   (`Image.MAX_IMAGE_PIXELS`, about 89 MP, left as the user set it) fires first for larger
   images, and its `DecompressionBombWarning` is turned into an error here (installed once
   per process by `install_bomb_guard`), so the effective limit is
   `min(max_pixels, Image.MAX_IMAGE_PIXELS)`;
5. JPEG draft mode: libjpeg decodes directly at 1/2, 1/4 or 1/8 scale when that is still at
   least the target size (much faster for big photos; the result is then resized as usual);
6. decode, EXIF orientation applied (a broken EXIF block is ignored, not fatal), converted
   to RGB (alpha composited on white; 16-bit and float images scaled to 8 bits), first frame
   of multi-frame files (`corrupt`: truncated or damaged data, whatever PIL raises);
7. resized (bilinear, antialiased) so that the longest side is at most `max_side`, keeping
   the aspect ratio; smaller images are not enlarged.
"""

from __future__ import annotations

import enum
import hashlib
import io
import math
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from segsearch.indexer.decode_budget import DecodeBudget, DecodeBudgetExhausted

# The formats PIL may try, and nothing else: the corpus formats (PIL's JPEG opener also
# returns the MPO files of many cameras). Letting PIL guess among all its plugins would, for
# instance, hand a PostScript file renamed .png to Ghostscript.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_SIDE = 512
DEFAULT_MAX_PIXELS = 50_000_000  # a 50 MP header is refused before decoding (~150 MB as RGB)

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}

_PIL_GUARD_LOCK = threading.Lock()
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")


class SkipReason(str, enum.Enum):
    """Why an image was not indexed (the `reason` field of `skipped.jsonl`)."""

    UNREADABLE = "unreadable"
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT = "corrupt"
    TOO_MANY_PIXELS = "too_many_pixels"
    DUPLICATE = "duplicate"  # same content (sha256) as an image already indexed
    IMAGE_ID_TAKEN = "image_id_taken"  # its image id is indexed already, with other content


@dataclass(frozen=True)
class DecodeConfig:
    """max_side: longest side after resizing; max_pixels: header size refused before decoding."""

    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_side < 8:
            raise ValueError(f"max_side must be >= 8, got {self.max_side}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass
class DecodedImage:
    """pixels: `(H, W, 3)` uint8 RGB, longest side <= max_side; original_size: `(W, H)` of
    the file after EXIF orientation, before resizing; sha256: hex digest of the file bytes."""

    pixels: np.ndarray
    sha256: str
    original_size: tuple[int, int]


@dataclass(frozen=True)
class SkippedImage:
    """A file that was not decoded, and why."""

    reason: SkipReason
    detail: str


class ImageSkipped(Exception):
    """Raised by `decode_bytes`; carries the `SkippedImage`."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.skipped = SkippedImage(reason, detail)


def install_bomb_guard() -> None:
    """Make PIL's `DecompressionBombWarning` an error in this process (idempotent).

    A warning would let a bomb decode; as an error it becomes a `too_many_pixels` skip. The
    filter is process-wide (Python's warnings filters are global), which is what a server
    decoding untrusted images wants too; it only affects images above PIL's own limit, which
    `decode_bytes` lifts to the configured one for its own opens (`_open`), so that the limit
    a user set is the one that applies and the one the message quotes.
    """
    for action, _, category, _, _ in warnings.filters:
        if action == "error" and category is Image.DecompressionBombWarning:
            return
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def decode_file(path: str | Path, config: DecodeConfig) -> DecodedImage | SkippedImage:
    """Read and decode one file; never raises (see the module docstring)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return SkippedImage(SkipReason.UNREADABLE, f"cannot read {path}: {exc.strerror or exc}")
    try:
        return decode_bytes(data, config)
    except ImageSkipped as exc:
        return exc.skipped


def decode_bytes(data: bytes, config: DecodeConfig, budget: DecodeBudget | None = None,
                 budget_timeout: float | None = None) -> DecodedImage:
    """Decode file contents to a bounded RGB array; raises `ImageSkipped` on any failure, and
    `DecodeBudgetExhausted` when `budget` has no room for it within `budget_timeout` s."""
    if not data:
        raise ImageSkipped(SkipReason.EMPTY_FILE, "the file is empty (0 bytes)")
    install_bomb_guard()
    digest = hashlib.sha256(data).hexdigest()
    try:
        with _open(data, config) as image:
            width, height = image.size
            _check_pixels(width, height, config)
            with (budget.reserve(width * height, budget_timeout) if budget else nullcontext()):
                pixels, size = _decode_opened(image, config)
    except (ImageSkipped, DecodeBudgetExhausted):
        raise
    except UnidentifiedImageError:
        if _has_image_signature(data):
            raise ImageSkipped(SkipReason.CORRUPT, "damaged image header (the file starts like an "
                               "image but PIL cannot parse it)") from None
        raise ImageSkipped(SkipReason.NOT_AN_IMAGE, "not an image in a format segsearch reads "
                           "(JPEG, PNG, WebP, BMP, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageSkipped(SkipReason.TOO_MANY_PIXELS, f"the image has far more pixels than the limit of "
                           f"{config.max_pixels} (possible decompression bomb; a larger limit is set with "
                           "--max-pixels)") from None
    except MemoryError:
        raise ImageSkipped(SkipReason.TOO_MANY_PIXELS, "out of memory while decoding") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors, ...
        raise ImageSkipped(SkipReason.CORRUPT, f"truncated or damaged image data ({type(exc).__name__}: {exc})") from None
    return DecodedImage(pixels, digest, size)


def _open(data: bytes, config: DecodeConfig) -> Image.Image:
    """`Image.open` of the corpus formats, reading the header only. PIL's own pixel guard
    (`Image.MAX_IMAGE_PIXELS`, process-wide, ~89 MP) would fire here, before our check, with its
    own numbers: it is raised to twice the configured limit for this open (the header is all
    that is read; `_check_pixels` then applies the configured limit and quotes it), and it stays
    in force beyond that, as a second line."""
    with _PIL_GUARD_LOCK:  # the limit is a module global; opens are header reads, quick
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None and saved < 2 * config.max_pixels:
            Image.MAX_IMAGE_PIXELS = 2 * config.max_pixels
        try:
            return Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _has_image_signature(data: bytes) -> bool:
    """True if the bytes start with the magic number of a corpus image format."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _check_pixels(width: int, height: int, config: DecodeConfig) -> None:
    if width < 1 or height < 1:
        raise ImageSkipped(SkipReason.CORRUPT, f"image has no pixels ({width}x{height})")
    if width * height > config.max_pixels:
        raise ImageSkipped(
            SkipReason.TOO_MANY_PIXELS,
            f"{width}x{height} = {width * height} pixels exceeds the limit of {config.max_pixels} "
            "(possible decompression bomb; a larger limit is set with --max-pixels)",
        )


def _decode_opened(image: Image.Image, config: DecodeConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Header-checked image -> (`(H, W, 3)` uint8 resized, `(W, H)` original after EXIF)."""
    orientation = _orientation(image)
    width, height = image.size
    scale = config.max_side / max(width, height)
    if scale < 1 and image.format in ("JPEG", "MPO"):
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    image.load()
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
        width, height = (height, width) if orientation >= 5 else (width, height)
    rgb = _to_rgb(image)
    longest = max(rgb.size)
    if longest > config.max_side:
        factor = config.max_side / longest
        size = (max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor)))
        rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), (width, height)


def _orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1 = as stored); a damaged EXIF block counts as 1."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit images keep their scale (/257); 32-bit int and float ones are min-max stretched."""
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        return np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    stretched = (np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12) * 255.0
    return np.clip(np.round(stretched), 0, 255).astype(np.uint8)
