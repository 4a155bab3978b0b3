"""IndexSettings: the one reader and writer of `indexing.json`."""
import json

import pytest

from segsearch.errors import IndexStoreError
from segsearch.indexer.config import SETTINGS_FILE, IndexConfig, IndexSettings
from segsearch.indexer.decode import DecodeConfig
from segsearch.spml.config import SegmenterConfig


def test_save_then_load_gives_the_same_settings_with_tuples_back(tmp_path):
    settings = IndexSettings(DecodeConfig(max_side=256), SegmenterConfig(grid=(5, 7), knn_k=3), "hnsw")
    settings.save(tmp_path)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["segmenter"]["grid"] == [5, 7]
    loaded = IndexSettings.load(tmp_path)
    assert loaded == settings and loaded.segmenter.grid == (5, 7)


def test_missing_file_is_none_and_unknown_keys_are_ignored(tmp_path):
    assert IndexSettings.load(tmp_path) is None
    document = IndexSettings().to_json()
    document["segmenter"]["from_a_newer_version"] = 1
    document["decode"].pop("max_side")
    loaded = IndexSettings.from_json(document)
    assert loaded.segmenter == SegmenterConfig() and loaded.decode.max_side == DecodeConfig().max_side


def test_differences_name_each_changed_setting():
    stored = IndexSettings.of(IndexConfig())
    wanted = IndexSettings(DecodeConfig(max_side=100), SegmenterConfig(grid=(4, 4)))
    assert wanted.differences(stored) == ["decode.max_side=100 (index: 512)", "segmenter.grid=(4, 4) (index: (8, 8))"]
    assert stored.differences(stored) == []


def test_a_damaged_file_says_what_to_do(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(IndexStoreError, match="delete it to accept the current settings"):
        IndexSettings.load(tmp_path)
