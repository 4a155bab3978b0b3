"""Unseen-data retrieval set: labelled mosaics of game textures from a Debian package.

Why this data: the demo model is trained on scikit-image's bundled photographs
(`trainer/mosaic.py`). To see how retrieval generalises, the benchmark needs real images of
classes and photographs the model never saw. Debian's `openarena-081-textures` ships
OpenArena's `pak4-textures.pk3` (a zip of ~1,650 JPEG/TGA game textures in material folders).
The folders mix unrelated pictures, so the classes here are hand-picked *texture families*
(file lists below), each visually coherent and made of several distinct source textures.

Fetching happens only when the bench is run (`apt-get download` + `dpkg -x`, cached under
`bench/out/`), never in tests or at query time.

Mosaics: each image is a warped-Voronoi partition (`trainer.mosaic.make_region_map`, the
same layout code as the training mosaic) of `size x size` pixels into 2..5 regions of
distinct classes; each region is filled with one source texture of its class, resized so
its side is `tile_side * scale` and *tiled* (game textures tile seamlessly) at a random
offset, with an intensity gain in `1 +- intensity_jitter`. The INDEX and QUERY mosaics draw
from **disjoint source textures** of every class (a per-class seeded split), so a query
never meets its own source picture in the index. Everything is a pure function of the
config (seeded per split and image).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DEB_PACKAGE = "openarena-081-textures"
# The .deb the published numbers were measured with (Debian 12); another version still works,
# but `deb_provenance` makes the difference visible in the results.
MEASURED_DEB = ("openarena-081-textures_0.8.5split-14_all.deb",
                "72bf05abd5286a1523b56ca04e25bceb775813d747f92ecd20749d512361a81f")
PK3_SUFFIX = "usr/share/games/openarena/baseoa/pak4-textures.pk3"

# class name -> source texture groups (paths inside the pk3). A group is one texture or a few
# near-identical ones ("a|b": the same picture recoloured or retouched); a group goes wholly to
# the index side or wholly to the query side, so a query never meets its own picture. The
# `.blend` variants and jpg/tga twins are left out, and of left/right halves only one is used.
TEXTURE_CLASSES: dict[str, tuple[tuple[str, ...], ...]] = {}


def _family(name: str, folder: str, *groups: str) -> None:
    TEXTURE_CLASSES[name] = tuple(tuple(f"textures/{folder}/{n}" for n in group.split("|"))
                                  for group in groups)


_family("lava", "liquids", "lavahell.jpg|lavavor.tga|protolava.jpg", "lavahell2.tga", "lavahell3.jpg",
        "lavahell4.tga")
_family("green_slime", "liquids", "slime7.jpg|slime7c.jpg", "slime8.jpg", "slime9.jpg", "slime10.jpg")
_family("water_caustics", "liquids", "pool3d_3.jpg|pool3d_3e.jpg", "pool3d_5.jpg|pool3d_5e.jpg",
        "pool3d_6.jpg")
_family("brick", "oquartz", *(f"sbrick{n}.jpg" for n in (
    "1", "2", "2a", "2aa", "2b", "3", "3a", "4", "4aa", "4b", "5", "6", "7", "9")))
_family("metal_relief", "gothic_cath", *(f"graycathflesh{n}L.jpg" for n in range(1, 6)))
_family("ceiling_light", "base_light", *(f"ceil1_{n}.tga" for n in (
    "22a", "30", "34", "37", "38", "39", "4")))
_family("wood_slats", "oquartz", *(f"tsl_side{n}.jpg" for n in ("", "2", "3", "4", "5", "6", "7")))
_family("riveted_plate", "oquartz", *(f"bolt{n}.jpg" for n in range(1, 20)))
_family("stone_blocks", "gothic_block", "block10d.jpg", "blocks10.jpg", "blocks11b.jpg", "blocks11d.jpg",
        "blocks17.jpg", "blocks17e.jpg", "blocks18b.jpg", "blocks18c.jpg", "blocks18d.jpg", "blocks19.jpg",
        "blocks9.jpg")
_family("floor_grate", "base_floor", "clanggrate.jpg", "clanggrate2.jpg", "pjgrate1.tga", "pjgrate2.tga",
        "proto_grate.tga", "proto_grate4.tga", "proto_rustygrate.tga", "proto_rustygrate2.tga")
_family("sky_clouds", "skies", *(f"s{n}.tga" for n in range(1, 21)))
_family("cobblestone", "oquartz", "ulrich17.jpg", "ulrich18.jpg", "ulrich22.jpg|ulrich22b.jpg",
        "ulrich23.jpg")

SPLITS = ("index", "query")


@dataclass(frozen=True)
class MosaicSetConfig:
    """What the retrieval mosaics look like; equal configs give identical images.

    query_share: share of each class's source textures reserved for QUERY mosaics (at
        least one texture per side).
    tile_side: side, in mosaic pixels, that a source texture is resized to before tiling
        (times a scale from `scales`), so textures authored at 64 or 512 px look alike.
    """

    size: int = 256
    num_index: int = 144
    num_query: int = 48
    min_regions: int = 2
    max_regions: int = 5
    seed: int = 11
    query_share: float = 0.35
    tile_side: int = 128
    scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    intensity_jitter: float = 0.1
    warp_strength: float = 0.12
    min_region_fraction: float = 0.04
    classes: tuple[str, ...] = tuple(TEXTURE_CLASSES)


@dataclass
class MosaicImage:
    """One mosaic: RGB pixels, per-pixel class index, and where each region came from."""

    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    classes: np.ndarray  # (H, W) int64 class index
    region_sources: list[dict] = field(default_factory=list)


# ---- fetching the package ------------------------------------------------------------------

def fetch_textures(cache_dir: Path, package: str = DEB_PACKAGE) -> Path:
    """Download and unpack the Debian package once; returns the folder holding `textures/`."""
    textures_root = cache_dir / "pk3"
    if (textures_root / "textures").is_dir():
        return textures_root
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{package}_*.deb")):
        log.info("apt-get download %s into %s", package, debs)
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
    deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
        pk3 = Path(tmp) / PK3_SUFFIX
        staging = cache_dir / "pk3.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(pk3) as archive:
            archive.extractall(staging)
        staging.rename(textures_root)
    log.info("unpacked %s into %s", deb.name, textures_root)
    return textures_root


def deb_provenance(cache_dir: Path, package: str = DEB_PACKAGE) -> dict:
    """File name and sha256 of the cached .deb, and whether it is the one measured in RESULTS.md."""
    import hashlib

    debs = sorted((cache_dir / "debs").glob(f"{package}_*.deb"))
    if not debs:
        return {"deb": None}
    digest = hashlib.sha256(debs[-1].read_bytes()).hexdigest()
    same = (debs[-1].name, digest) == MEASURED_DEB
    if not same:
        log.warning("%s (sha256 %s) is not the package RESULTS.md was measured with (%s)",
                    debs[-1].name, digest, MEASURED_DEB[0])
    return {"deb": debs[-1].name, "sha256": digest, "as_measured": same}


def load_source(textures_root: Path, relative: str) -> np.ndarray:
    """A texture as (H, W, 3) uint8 RGB; transparent pixels (grates) composited on black."""
    with Image.open(textures_root / relative) as opened:
        rgba = opened.convert("RGBA")
    pixels = np.asarray(rgba).astype(np.float32)
    alpha = pixels[..., 3:4] / 255.0
    return np.clip(pixels[..., :3] * alpha + 0.5, 0, 255).astype(np.uint8)


# ---- the index/query split of source textures --------------------------------------------

def split_sources(config: MosaicSetConfig) -> dict[str, dict[str, list[str]]]:
    """`{split: {class: [source paths]}}`: a seeded, per-class, disjoint split of the groups."""
    split: dict[str, dict[str, list[str]]] = {name: {} for name in SPLITS}
    for class_index, name in enumerate(config.classes):
        groups = TEXTURE_CLASSES[name]
        order = np.random.default_rng([config.seed, 7, class_index]).permutation(len(groups))
        num_query = min(len(groups) - 1, max(1, round(config.query_share * len(groups))))
        split["query"][name] = [path for i in sorted(order[:num_query]) for path in groups[i]]
        split["index"][name] = [path for i in sorted(order[num_query:]) for path in groups[i]]
    return split


# ---- mosaics -------------------------------------------------------------------------------

class MosaicMaker:
    """Builds the mosaics of one split from the textures of that split only."""

    def __init__(self, config: MosaicSetConfig, textures_root: Path, split: str):
        self.config = config
        self.split = split
        self.sources = split_sources(config)[split]
        self._pixels = {path: load_source(textures_root, path)
                        for paths in self.sources.values() for path in paths}
        self._tiles: dict[tuple[str, float], np.ndarray] = {}

    def __len__(self) -> int:
        return self.config.num_index if self.split == "index" else self.config.num_query

    def make(self, index: int) -> MosaicImage:
        from segsearch.trainer.mosaic import make_region_map

        cfg = self.config
        rng = np.random.default_rng([cfg.seed, SPLITS.index(self.split), index])
        regions = self._layout(rng, make_region_map)
        num_regions = int(regions.max()) + 1
        classes = rng.choice(len(cfg.classes), size=num_regions, replace=False)
        image = np.empty((cfg.size, cfg.size, 3), dtype=np.uint8)
        provenance = []
        for region, class_index in enumerate(classes):
            inside = regions == region
            fill, source = self._fill(rng, cfg.classes[int(class_index)])
            image[inside] = fill[inside]
            provenance.append({"region": region, "class": cfg.classes[int(class_index)], **source})
        truth = classes[regions].astype(np.int64)
        return MosaicImage(f"{self.split}-{index:04d}.png", image, truth, provenance)

    def _layout(self, rng: np.random.Generator, make_region_map) -> np.ndarray:
        cfg = self.config
        num_regions = int(rng.integers(cfg.min_regions, cfg.max_regions + 1))
        min_area = cfg.min_region_fraction * cfg.size * cfg.size
        for _ in range(20):
            regions = make_region_map(rng, cfg.size, num_regions, cfg.warp_strength)
            if np.bincount(regions.ravel(), minlength=num_regions).min() >= min_area:
                return regions
        _, regions = np.unique(regions, return_inverse=True)  # keep the last, renumbered
        return regions.reshape(cfg.size, cfg.size).astype(np.int64)

    def _fill(self, rng: np.random.Generator, class_name: str) -> tuple[np.ndarray, dict]:
        """A (size, size, 3) tiling of one source texture of the class, offset and gain random."""
        cfg = self.config
        paths = self.sources[class_name]
        path = paths[int(rng.integers(len(paths)))]
        scale = float(cfg.scales[int(rng.integers(len(cfg.scales)))])
        tile = self._tile(path, scale)
        dy, dx = (int(rng.integers(n)) for n in tile.shape[:2])
        reps = (cfg.size // tile.shape[0] + 2, cfg.size // tile.shape[1] + 2, 1)
        fill = np.tile(tile, reps)[dy: dy + cfg.size, dx: dx + cfg.size]
        gain = 1.0 + rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter)
        fill = np.clip(fill.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        return fill, {"source": path, "scale": scale, "gain": round(float(gain), 4)}

    def _tile(self, path: str, scale: float) -> np.ndarray:
        key = (path, scale)
        if key not in self._tiles:
            side = max(8, round(self.config.tile_side * scale))
            resized = Image.fromarray(self._pixels[path]).resize((side, side), Image.Resampling.BICUBIC)
            self._tiles[key] = np.asarray(resized)
        return self._tiles[key]


# ---- writing the set -------------------------------------------------------------------------

def write_split(maker: MosaicMaker, out_dir: Path) -> list[dict]:
    """Images under out_dir/<split>/, ground truth under out_dir/<split>_gt/ (class PNGs)."""
    images_dir, gt_dir = out_dir / maker.split, out_dir / f"{maker.split}_gt"
    images_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(len(maker)):
        mosaic = maker.make(index)
        Image.fromarray(mosaic.image).save(images_dir / mosaic.image_id)
        Image.fromarray(mosaic.classes.astype(np.uint8)).save(gt_dir / mosaic.image_id)
        records.append({"image_id": mosaic.image_id, "regions": mosaic.region_sources})
    return records


def build_mosaic_set(config: MosaicSetConfig, textures_root: Path, out_dir: Path) -> Path:
    """Write both splits (once: reused when `dataset.json` matches the config)."""
    manifest = out_dir / "dataset.json"
    wanted = {"config": asdict(config), "package": DEB_PACKAGE}
    if manifest.exists() and json.loads(manifest.read_text()).get("wanted") == json.loads(json.dumps(wanted)):
        log.info("mosaic set cached in %s", out_dir)
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    splits = {split: write_split(MosaicMaker(config, textures_root, split), out_dir) for split in SPLITS}
    manifest.write_text(json.dumps({"wanted": wanted, "sources": split_sources(config),
                                    "images": splits}, indent=1))
    log.info("wrote %d index and %d query mosaics to %s", config.num_index, config.num_query, out_dir)
    return out_dir


def load_ground_truth(out_dir: Path, split: str, image_id: str) -> np.ndarray:
    """(H, W) int64 class index of one written mosaic."""
    return np.asarray(Image.open(out_dir / f"{split}_gt" / image_id)).astype(np.int64)


# ---- the contact sheet ---------------------------------------------------------------------

def contact_sheet(config: MosaicSetConfig, textures_root: Path, data_dir: Path, path: Path,
                  per_class: int = 9, mosaics: int = 6, mosaic_side: int = 192) -> Path:
    """Class rows (index sources, a gap, query sources), then mosaics with region names."""
    from PIL import ImageDraw

    thumb, label_width = 64, 120
    split = split_sources(config)
    class_rows_height = len(config.classes) * (thumb + 2)
    width = max(label_width + per_class * (thumb + 2) + 12, mosaics * (mosaic_side + 4))
    sheet = Image.new("RGB", (width, class_rows_height + 2 * (mosaic_side + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(config.classes):
        y = row * (thumb + 2)
        index_sources, query_sources = split["index"][name], split["query"][name]
        draw.text((2, y + 4), f"{name}\nindex: {len(index_sources)} textures\nquery: {len(query_sources)}",
                  fill="black")
        shown_query = query_sources[:3]
        shown_index = index_sources[: per_class - len(shown_query)]
        shown = [(s, 0) for s in shown_index] + [(s, 12) for s in shown_query]  # a gap before query
        for col, (source, gap) in enumerate(shown):
            tile = Image.fromarray(load_source(textures_root, source)).resize((thumb, thumb))
            sheet.paste(tile, (label_width + col * (thumb + 2) + gap, y))
    for row, which in enumerate(SPLITS):
        for col in range(mosaics):
            image_id = f"{which}-{col:04d}.png"
            x, y = col * (mosaic_side + 4), class_rows_height + 4 + row * (mosaic_side + 16)
            image = Image.open(data_dir / which / image_id).convert("RGB")
            scale = mosaic_side / image.width
            sheet.paste(image.resize((mosaic_side, mosaic_side)), (x, y + 12))
            draw.text((x, y), image_id, fill="black")
            truth = load_ground_truth(data_dir, which, image_id)
            for class_index in np.unique(truth):
                ys, xs = np.nonzero(truth == class_index)
                centre = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
                label_xy = (x + xs[centre] * scale - 20, y + 12 + ys[centre] * scale - 5)
                draw.text(label_xy, config.classes[int(class_index)], fill="white", stroke_width=2,
                          stroke_fill="black")
    sheet.save(path)
    return path
