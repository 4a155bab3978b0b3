"""What to index: a directory tree of images, or a JSONL manifest of image URIs.

A corpus is a list of `CorpusItem`s in a stable order, so that a re-run of the same command
walks the images in the same order (resuming skips the ones already indexed).

- **Directory**: every file under it (recursively, symlinked folders not followed) whose
  extension is one of `IMAGE_EXTENSIONS`, case-insensitive; hidden files and folders (name
  starting with ".") are left out. `image_id` is the path relative to the directory with
  "/" separators, items are sorted by it.
- **Manifest** (any other file, normally `*.jsonl`): one JSON object per line,
  `{"uri": "...", "image_id": "...", "tags": ["..."]}`; `image_id` defaults to the uri as
  written, `tags` to none. Relative uris (and `file://` uris) are resolved against the
  manifest's folder; other schemes are refused (nothing is downloaded). Blank lines and lines
  starting with "#" are ignored. The manifest's order is kept.

Nothing here opens the images: a missing or unreadable image is the decoder's business (it is
skipped and reported, the job goes on); only a corpus that cannot be listed is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from segsearch.errors import DatasetError
from segsearch.indexer.image_ids import image_id_problem

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class CorpusItem:
    """One image to index: its id in the index, its absolute file path, optional tags."""

    image_id: str
    uri: str
    tags: tuple[str, ...] = ()


def read_corpus(path: str | Path) -> list[CorpusItem]:
    """List the corpus at `path` (a directory tree or a JSONL manifest; see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"corpus not found: {path}; give a directory of images or a JSONL manifest "
            '(one {"uri": ...} object per line)'
        )
    items = _read_directory(path) if path.is_dir() else _read_manifest(path)
    if not items:
        what = (f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {path}"
                if path.is_dir() else f"the manifest {path} lists no images")
        raise DatasetError(f"empty corpus: {what}; point CORPUS at a folder of images or a non-empty manifest")
    return items


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _read_directory(root: Path) -> list[CorpusItem]:
    items = []
    for folder, subfolders, files in os.walk(root, onerror=_raise_walk_error):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if is_image_file(name):
                full = Path(folder) / name
                items.append(CorpusItem(full.relative_to(root).as_posix(), os.path.abspath(full)))
    items.sort(key=lambda item: item.image_id)
    for item in items:
        _check_image_id(item.image_id, str(root))
    return items


def _raise_walk_error(error: OSError) -> None:
    raise DatasetError(f"cannot list the corpus folder {error.filename}: {error.strerror}")


def _read_manifest(manifest: Path) -> list[CorpusItem]:
    if manifest.suffix.lower() in IMAGE_EXTENSIONS:
        raise DatasetError(
            f"{manifest} is an image, not a corpus; give the folder that holds it, or a JSONL manifest"
        )
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read the corpus manifest {manifest}: {exc}") from exc
    items: list[CorpusItem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = _manifest_item(manifest, number, line)
        if item.image_id in first_line:
            raise DatasetError(
                f"{manifest}:{number}: image_id {item.image_id!r} already used on line "
                f"{first_line[item.image_id]}; every image needs its own image_id"
            )
        first_line[item.image_id] = number
        items.append(item)
    return items


def _manifest_item(manifest: Path, number: int, line: str) -> CorpusItem:
    where = f"{manifest}:{number}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                           'each line must be an object such as {"uri": "images/a.jpg"}') from None
    if not isinstance(entry, dict):
        raise DatasetError(f'{where}: expected a JSON object such as {{"uri": "images/a.jpg"}}')
    uri = entry.get("uri")
    if not isinstance(uri, str) or not uri:
        raise DatasetError(f'{where}: missing "uri" (a file path, absolute or relative to the manifest)')
    image_id = entry.get("image_id", uri)
    if not isinstance(image_id, str) or not image_id:
        raise DatasetError(f'{where}: "image_id" must be a non-empty string')
    tags = entry.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise DatasetError(f'{where}: "tags" must be a list of strings')
    _check_image_id(image_id, where)
    return CorpusItem(image_id, _resolve_uri(uri, manifest.parent, where), tuple(tags))


def _resolve_uri(uri: str, base: Path, where: str) -> str:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        uri = unquote(parsed.path)
    elif len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise DatasetError(f"{where}: uri scheme {parsed.scheme!r} is not supported; "
                           "segsearch indexes local files only (download the images first)")
    path = Path(uri).expanduser()
    return os.path.abspath(path if path.is_absolute() else base / path)


def _check_image_id(image_id: str, where: str) -> None:
    problem = image_id_problem(image_id)
    if problem is not None:
        raise DatasetError(f"{where}: image_id {image_id[:60]!r} cannot be used: {problem}. Rename the "
                           "file, or give the image an image_id in a JSONL manifest")