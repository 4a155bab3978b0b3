"""Corpus listing: directory trees and JSONL manifests, and the errors a user can make."""
import json
import os

import pytest

from segsearch.errors import DatasetError
from segsearch.indexer.corpus import CorpusItem, read_corpus


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_directory_lists_images_recursively_sorted_with_relative_ids(tmp_path):
    for name in ["b.JPG", "a.png", "sub/c.webp", "sub/deeper/d.TIFF", "e.bmp", "f.jpeg", "g.tif",
                 "notes.txt", "h.gif", ".hidden.png", ".cache/x.png"]:
        _touch(tmp_path / name)
    items = read_corpus(tmp_path)
    assert [item.image_id for item in items] == [
        "a.png", "b.JPG", "e.bmp", "f.jpeg", "g.tif", "sub/c.webp", "sub/deeper/d.TIFF"]
    assert all(os.path.isabs(item.uri) and os.path.isfile(item.uri) for item in items)
    assert items[-1].uri == str(tmp_path / "sub" / "deeper" / "d.TIFF")
    assert all(item.tags == () for item in items)


def test_manifest_resolves_relative_uris_and_keeps_order_ids_and_tags(tmp_path):
    _touch(tmp_path / "imgs" / "one.jpg")
    absolute = tmp_path / "elsewhere" / "two.png"
    _touch(absolute)
    lines = [
        json.dumps({"uri": "imgs/one.jpg", "tags": ["cat", "indoor"]}),
        "",
        "# a comment",
        json.dumps({"uri": str(absolute), "image_id": "second"}),
        json.dumps({"uri": f"file://{absolute}", "image_id": "third"}),
    ]
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    assert read_corpus(manifest) == [
        CorpusItem("imgs/one.jpg", str(tmp_path / "imgs" / "one.jpg"), ("cat", "indoor")),
        CorpusItem("second", str(absolute)),
        CorpusItem("third", str(absolute)),
    ]


@pytest.mark.parametrize("bad_line, phrase", [
    ('{"uri": "a.jpg"', "not valid JSON"),
    ('["a.jpg"]', "JSON object"),
    ('{"image_id": "a"}', 'missing "uri"'),
    ('{"uri": "a.jpg", "tags": "cat"}', '"tags" must be a list'),
    ('{"uri": "http://example.com/a.jpg"}', "local files only"),
])
def test_bad_manifest_line_names_the_line(tmp_path, bad_line, phrase):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"uri": "ok.jpg"}\n\n' + bad_line + "\n")
    with pytest.raises(DatasetError) as info:
        read_corpus(manifest)
    assert f"{manifest}:3" in str(info.value) and phrase in str(info.value)


def test_duplicate_image_id_in_manifest_is_refused(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"uri": "a.jpg", "image_id": "x"}\n{"uri": "b.jpg", "image_id": "x"}\n')
    with pytest.raises(DatasetError, match="already used on line 1"):
        read_corpus(manifest)


def test_missing_path_says_what_to_give(tmp_path):
    with pytest.raises(DatasetError, match="corpus not found.*directory of images or a JSONL manifest"):
        read_corpus(tmp_path / "nowhere")


def test_empty_directory_and_empty_manifest_are_errors(tmp_path):
    _touch(tmp_path / "d" / "readme.txt")
    with pytest.raises(DatasetError, match="empty corpus: no image files"):
        read_corpus(tmp_path / "d")
    (tmp_path / "m.jsonl").write_text("\n# nothing\n")
    with pytest.raises(DatasetError, match="lists no images"):
        read_corpus(tmp_path / "m.jsonl")


def test_a_single_image_file_is_not_a_corpus(tmp_path):
    _touch(tmp_path / "a.jpg")
    with pytest.raises(DatasetError, match="is an image, not a corpus"):
        read_corpus(tmp_path / "a.jpg")
