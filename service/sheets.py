"""Pictures of service answers that a person reads at a glance.

- `contact_sheet`: the query image with its region tinted and outlined (the rest dimmed), then
  one tile per hit: the hit's image with the segment tinted and outlined, the rest dimmed, captioned with
  rank, score, label and image id. A hit's image is read from its `image_uri` when that is a
  readable local file (the client's side: the server never reads client paths); otherwise
  the tile shows the mask alone on grey.
- `segmentation_overlay`: the image with segment boundaries | the label map over the image,
  with a legend of the labels present.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps
from scipy import ndimage

from segsearch.service.pngs import decode_png_array
from segsearch.spml.palette import class_colours

TILE = 224
CAPTION = 40
OUTLINE = (255, 40, 40)
QUERY_OUTLINE = (40, 220, 255)
BACKGROUND = (245, 245, 245)


@dataclass
class Tile:
    """An image (H, W, 3) uint8 with a highlighted region (H, W) bool, and caption lines."""

    image: np.ndarray
    mask: np.ndarray | None
    lines: tuple[str, ...]
    colour: tuple[int, int, int] = OUTLINE


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font without sizes
        return ImageFont.load_default()


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary pixels of a boolean mask (H, W), `width` pixels thick, inside the region."""
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


FILL = 0.3  # share of the highlight colour in a region's pixels


def highlight(image: np.ndarray, mask: np.ndarray | None, colour) -> np.ndarray:
    """Dim everything outside `mask`, tint it with `colour` and outline it in `colour`, the
    outline thick enough (about 2 px of a TILE-sized thumbnail) to see at thumbnail size."""
    picture = image.astype(np.float32)
    if mask is None or not mask.any():
        return image.copy()
    picture[~mask] *= 0.45
    picture[mask] = (1 - FILL) * picture[mask] + FILL * np.asarray(colour, np.float32)
    thickness = max(2, round(2 * max(mask.shape) / TILE))
    picture[outline(mask, thickness)] = colour
    return picture.clip(0, 255).astype(np.uint8)


def _fit_tile(image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale image (bilinear) and mask (nearest) to fill a TILE x TILE box, up or down."""
    height, width = image.shape[:2]
    scale = min(TILE / width, TILE / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127
    return picture, mask


def _render_tile(tile: Tile, font) -> Image.Image:
    image, mask = _fit_tile(tile.image, tile.mask)
    picture = Image.fromarray(highlight(image, mask, tile.colour))
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), BACKGROUND)
    canvas.paste(picture, ((TILE - picture.width) // 2, (TILE - picture.height) // 2))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(tile.lines[:2]):
        draw.text((4, TILE + 3 + 18 * number), _fit(line, draw, font, TILE - 8), fill="black", font=font)
    return canvas


def _fit(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def tile_grid(tiles: list[Tile], columns: int = 6, title: str = "") -> Image.Image:
    font = _font()
    rendered = [_render_tile(tile, font) for tile in tiles]
    columns = max(1, min(columns, len(rendered)))
    rows = -(-len(rendered) // columns)
    header = 26 if title else 0
    sheet = Image.new("RGB", (columns * (TILE + 6) + 6, header + rows * (TILE + CAPTION + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 5), title, fill="black", font=_font(15))
    for index, image in enumerate(rendered):
        row, col = divmod(index, columns)
        sheet.paste(image, (6 + col * (TILE + 6), header + 6 + row * (TILE + CAPTION + 6)))
    return sheet


def read_local_image(uri: str, size: tuple[int, int], images_root: str | Path | None = None) -> np.ndarray | None:
    """The image at a local path / file:// uri resized to `size` (W, H), or None. A relative uri
    (what a server shows by default: the path under the corpus root) is looked up under
    `images_root`."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if path and images_root is not None and not Path(path).is_absolute():
        path = str(Path(images_root) / path)
    if not path or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            return np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    except Exception:  # an unreadable file just loses its picture
        return None


def decode_mask(png: bytes) -> np.ndarray | None:
    if not png:
        return None
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("L")) > 127


def contact_sheet(query_image: np.ndarray, query_mask: np.ndarray | None, hits, out_path: str | Path,
                  title: str = "", columns: int = 6, images_root: str | Path | None = None) -> Path:
    """Write the query tile and one tile per hit (proto `Hit`s with masks) to `out_path`."""
    tiles = [Tile(query_image, query_mask, ("query", title), QUERY_OUTLINE)]
    for rank, hit in enumerate(hits, start=1):
        size = (hit.image_width, hit.image_height)
        mask = decode_mask(hit.mask_png)
        picture = read_local_image(hit.image_uri, size, images_root)
        if picture is None:
            picture = np.full((size[1], size[0], 3), 150, np.uint8)
        label = f" {hit.label} ({hit.label_score:.2f})" if hit.label else ""
        tiles.append(Tile(picture, mask, (f"#{rank}  {hit.score:.3f}{label}", f"{hit.image_id}  id {hit.segment_id}")))
    sheet = tile_grid(tiles, columns, title=f"segsearch query: {len(hits)} hits, best first")
    return _save(sheet, out_path)


def segmentation_overlay(image: np.ndarray, segment_map: np.ndarray, label_map: np.ndarray,
                         labels: list[str], out_path: str | Path) -> Path:
    """image with segment boundaries | label colours over the image, with a legend."""
    boundaries = _boundaries(segment_map)
    left = image.copy()
    left[boundaries] = (255, 255, 0)
    colours = class_colours()
    known = label_map < len(labels)
    right = image.astype(np.float32) * 0.4
    right[known] += 0.6 * colours[label_map[known]]
    right[boundaries] = 0
    panel = np.concatenate([left, np.full((image.shape[0], 6, 3), 255, np.uint8), right.astype(np.uint8)], axis=1)
    present = sorted({int(v) for v in np.unique(label_map) if v < len(labels)})
    font = _font()
    scale = max(1.0, 480 / panel.shape[1])
    picture = Image.fromarray(panel)
    if scale > 1:
        picture = picture.resize((round(panel.shape[1] * scale), round(panel.shape[0] * scale)),
                                 Image.Resampling.NEAREST)
    legend_rows = -(-len(present) // 3) if present else 0
    canvas = Image.new("RGB", (picture.width, picture.height + 26 + 20 * legend_rows), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    count = len(np.unique(segment_map[segment_map != 65535]))
    unlabelled = bool(((label_map >= len(labels)) & (segment_map != 65535)).any())
    note = " (uncoloured: no label)" if unlabelled else ""
    draw.text((4, picture.height + 4), f"{count} segments | labels by k-NN vote{note}", fill="black", font=font)
    column = picture.width // 3
    for number, index in enumerate(present):
        x, y = 4 + (number % 3) * column, picture.height + 24 + 20 * (number // 3)
        draw.rectangle([x, y, x + 13, y + 13], fill=tuple(int(c) for c in colours[index]))
        draw.text((x + 18, y), labels[index], fill="black", font=font)
    return _save(canvas, out_path)


def _boundaries(segment_map: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour lies in another segment."""
    edges = np.zeros(segment_map.shape, bool)
    edges[:, :-1] |= segment_map[:, :-1] != segment_map[:, 1:]
    edges[:-1, :] |= segment_map[:-1, :] != segment_map[1:, :]
    return edges


def _save(image: Image.Image, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path)
    return out_path


# ---- from a service answer to a picture (the `query` and `segment` commands, the demo) ----------

def decode_image_bytes(data: bytes) -> np.ndarray:
    """Encoded image bytes -> `(H, W, 3)` uint8 RGB, EXIF orientation applied (as the server does)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def write_query_sheet(image: bytes | None, response, out_path: str | Path, title: str,
                      images_root: str | Path | None = None) -> Path:
    """The contact sheet of a SearchSimilar answer. `image`: the query's encoded bytes, or None
    for a search by segment id, whose own hit (first) then stands for the query."""
    if image is not None:
        return contact_sheet(decode_image_bytes(image), decode_mask(response.query_mask_png),
                             list(response.hits), out_path, title=title, images_root=images_root)
    picture, mask = np.full((64, 64, 3), 200, np.uint8), None
    if response.hits:
        first = response.hits[0]
        picture = read_local_image(first.image_uri, (first.image_width, first.image_height), images_root)
        if picture is None:
            picture = np.full((first.image_height, first.image_width, 3), 150, np.uint8)
        mask = decode_mask(first.mask_png)
    return contact_sheet(picture, mask, list(response.hits), out_path, title=title, images_root=images_root)


def write_segment_overlay(image: bytes, response, out_path: str | Path) -> Path:
    """The overlay of a Segment answer over the encoded image it was asked about."""
    return segmentation_overlay(decode_image_bytes(image), decode_png_array(response.segment_map_png),
                                decode_png_array(response.label_map_png), list(response.labels), out_path)


def write_viewable_maps(response, prefix: str) -> list[Path]:
    """A SegmentResponse's maps as colour PNGs an image viewer shows (the 16-bit segment map
    itself looks black there: its values are 0..n): PREFIX_segments_colour.png, one palette
    colour per segment, and PREFIX_labels_colour.png, one per label, black where none."""
    from segsearch.service.segment_rpc import NO_LABEL, NO_SEGMENT

    segments = decode_png_array(response.segment_map_png).astype(np.int64)
    labels = decode_png_array(response.label_map_png).astype(np.int64)
    colours = class_colours()
    written = []
    for name, values, missing in (("segments", segments, NO_SEGMENT), ("labels", labels, NO_LABEL)):
        rgb = colours[values % len(colours)]
        rgb[values == missing] = 0
        written.append(_save(Image.fromarray(rgb.astype(np.uint8)), f"{prefix}_{name}_colour.png"))
    return written
