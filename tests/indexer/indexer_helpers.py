"""Helpers the indexer tests share: a tiny checkpoint trained once per session, small photo
corpora and bad files, and synthetic IndexStore records (vertical strips, deterministic in the
image id). Plain functions, imported by the tests (pytest puts this folder on sys.path) and
by the child processes of the crash tests."""
import dataclasses
import hashlib
import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from segsearch.indexer.index_store import IndexStore
from segsearch.indexer.pipeline import IndexConfig
from segsearch.indexer.records import LEVEL_REGION, ImageRecord, SegmentRecord
from segsearch.indexer.rle import decode_mask, encode_mask, mask_box
from model_helpers import SEGMENTER, photo
from segsearch.testing.images import png_claiming

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def write_photos(folder: Path, flips: bool = False) -> list[str]:
    """The six photos (and their mirror images) as small JPEG/PNG files; returns the image ids."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for n, name in enumerate(PHOTOS):
        for flip in (False, True) if flips else (False,):
            file = f"{name}{'_flip' if flip else ''}.{'png' if n % 2 else 'jpg'}"
            Image.fromarray(photo(name, flip=flip)).save(folder / file)
            ids.append(file)
    return sorted(ids)


def png_header_claiming(width: int, height: int) -> bytes:
    return png_claiming(width, height, colour=2)  # RGB


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files that must be skipped, with the reason expected in skipped.jsonl."""
    buffer = io.BytesIO()
    Image.fromarray(photo("coffee")).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    files = {
        "bad_empty.jpg": (b"", "empty_file"),
        "bad_text.png": (b"just some text, not a PNG\n", "not_an_image"),
        "bad_truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "bad_corrupt.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt"),
        "bad_bomb.png": (png_header_claiming(40_000, 40_000), "too_many_pixels"),
    }
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {name: reason for name, (_, reason) in files.items()}


def small_config(**overrides) -> IndexConfig:
    values = dict(batch_size=2, chunk_size=3, segmenter=SEGMENTER, progress=False, decode_workers=2, save_every=2)
    values.update(overrides)
    return IndexConfig(**values)



def all_prototypes(store: IndexStore):
    """(segment ids (N,), prototypes (N, D)) of every stored segment."""
    ids, protos = zip(*store._metadata.prototypes())
    return np.concatenate(ids), np.concatenate(protos)


# ---- synthetic IndexStore records ------------------------------------------------------

DIM = 16
MODEL = "spml-test-1"


def make_image(image_id: str, n_segments: int = 4, model: str = MODEL, content: str = "") -> tuple:
    """A synthetic image of vertical strips, deterministic in its id (and `content`)."""
    rng = np.random.default_rng(zlib.crc32(f"{image_id}{content}".encode()))
    height, width = 12, 20
    edges = np.linspace(0, width, n_segments + 1).astype(int)
    segments = []
    for s in range(n_segments):
        mask = np.zeros((height, width), bool)
        mask[:, edges[s]:edges[s + 1]] = True
        proto = rng.standard_normal(DIM).astype(np.float32)
        segments.append(SegmentRecord(
            0, image_id, mask_box(mask), mask.mean(), encode_mask(mask), mask.shape,
            f"class{s}", 0.5 + 0.1 * s, model, proto / np.linalg.norm(proto),
        ))
    sha = hashlib.sha256(f"{image_id}{content}".encode()).hexdigest()
    return ImageRecord(image_id, f"file:///corpus/{image_id}.png", width, height, sha), segments


def make_batch(names) -> list:
    return [make_image(name) for name in names]


def with_regions(image: ImageRecord, fine: list[SegmentRecord]) -> tuple:
    """`image` with its fine segments followed by two regions, the left and the right half of
    them (parents named by position, as the indexer names them)."""
    half = len(fine) // 2
    groups = (fine[:half], fine[half:])
    regions = []
    for number, members in enumerate(groups):
        mask = np.logical_or.reduce([decode_mask(s.mask_rle, s.mask_shape) for s in members])
        summed = np.sum([s.prototype for s in members], axis=0)
        regions.append(SegmentRecord(0, image.image_id, mask_box(mask), mask.mean(), encode_mask(mask), mask.shape,
                                     "", 0.0, members[0].model_version, summed / np.linalg.norm(summed),
                                     LEVEL_REGION))
    children = [dataclasses.replace(s, parent_index=len(fine) + (n >= half)) for n, s in enumerate(fine)]
    return image, children + regions


def fill(store: IndexStore, n_images: int = 120, chunk: int = 30) -> None:
    for start in range(0, n_images, chunk):
        store.add_images(make_batch(f"img{i:04d}" for i in range(start, start + chunk)))
