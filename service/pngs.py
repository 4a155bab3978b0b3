"""PNG encoding of masks and maps sent to clients, and decoding of client mask PNGs.

- masks sent to clients: 8-bit greyscale, 255 inside, 0 outside;
- segment maps: 16-bit greyscale (`I;16`), the segment index per pixel (up to 65535 segments);
- label maps: 8-bit greyscale, the class index per pixel (up to 256 classes).

A client's mask may be any PNG mode PIL reads: greyscale, 1-bit, 16-bit, palette (the raw
palette index counts, not its colour), RGB(A) (any non-zero colour channel). Non-zero means
inside. It must have exactly its image's size, which also bounds its pixel count by the
image's (so a mask cannot be a decompression bomb the image was not). Only PIL's PNG
reader ever sees the bytes (no format guessing: an EPS "mask" would reach Ghostscript).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from segsearch.indexer.rle import decode_mask
from segsearch.service.errors import InvalidArgument

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


def encode_image_png(pixels: np.ndarray) -> bytes:
    """An RGB `(H, W, 3)` or grey `(H, W)` uint8 array as a PNG file with PIL's default
    settings: the query and corpus images that clients, tests and benches send."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Boolean mask (H, W) -> 8-bit greyscale PNG (255 inside)."""
    return _png_bytes(Image.fromarray(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8), mode="L"))


def encode_rle_mask_png(counts: list[int], shape: tuple[int, int]) -> bytes:
    """A stored RLE mask (see `indexer.rle`) -> 8-bit greyscale PNG."""
    return encode_mask_png(decode_mask(counts, shape))


def encode_segment_map_png(segment_map: np.ndarray) -> bytes:
    """Segment index per pixel (H, W), values < 65536 -> 16-bit greyscale PNG."""
    values = np.asarray(segment_map)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError("a 16-bit segment map holds indices 0..65535")
    return _png_bytes(Image.fromarray(values.astype(np.uint16)))


def encode_label_map_png(label_map: np.ndarray) -> bytes:
    """Class index per pixel (H, W), values < 256 -> 8-bit greyscale PNG."""
    values = np.asarray(label_map)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError("an 8-bit label map holds class indices 0..255")
    return _png_bytes(Image.fromarray(values.astype(np.uint8), mode="L"))


def decode_png_array(data: bytes) -> np.ndarray:
    """Any PNG -> its raw values (H, W) or (H, W, C), 16-bit kept (for tests and clients)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def decode_mask_png(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Client mask PNG -> boolean (H, W); `size` is the image's (W, H), which the mask must match."""
    if not data:
        raise InvalidArgument("region.mask_png is empty; send a PNG of the image's size, non-zero inside")
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidArgument("region.mask_png is not a readable image: not a PNG (no PNG signature); "
                              "send a PNG of the image's size, non-zero inside")
    try:
        # PNG only: letting PIL guess among all its plugins would, e.g., hand an EPS file to Ghostscript.
        with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
            if image.size != tuple(size):
                raise InvalidArgument(
                    f"region.mask_png is {image.size[0]}x{image.size[1]} but the image is "
                    f"{size[0]}x{size[1]} (width x height); the mask must have the image's size")
            image.load()
            values = np.asarray(image)
    except InvalidArgument:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise InvalidArgument(f"region.mask_png is not a readable image ({type(exc).__name__}: {exc})") from None
    if values.ndim == 3:
        channels = values.shape[2]
        values = values[..., : 3 if channels >= 3 else 1]  # colour channels; alpha ignored
        return (values != 0).any(axis=2)
    return values != 0
