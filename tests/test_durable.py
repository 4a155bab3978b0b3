"""segsearch.durable: the one durable-write helper, and spml.device: the one device resolver."""
import errno
import os
import stat

import pytest
import torch

from segsearch.durable import atomic_write, atomic_write_json, remove_stale_temp_files, temp_path
from segsearch.errors import IndexFullError, SegsearchError, StorageFailedError
from segsearch.spml.device import resolve_device


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    atomic_write(target, [b"new ", memoryview(b"content")])
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_the_file_and_its_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_json(tmp_path / "settings.json", {"b": 1, "a": [1, 2]})
    assert synced == [False, True]  # the temp file, then the directory holding the rename
    assert (tmp_path / "settings.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def crash(*_):
        raise KeyboardInterrupt  # stands for the process dying between write and rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and not temp_path(target).exists()


def test_a_full_disk_is_index_full_with_the_old_file_intact(small_disk):
    target = small_disk / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(IndexFullError, match="no space left on the filesystem mounted at .*previous file is intact"):
        atomic_write(target, [bytes(1 << 20)] * 5)  # 5 MiB into a real 4 MiB tmpfs
    assert target.read_bytes() == b"old" and [p.name for p in small_disk.iterdir()] == ["file.bin"]


def test_a_failed_fsync_is_storage_failed_not_retried(tmp_path, monkeypatch):
    calls = []

    def eio(fd):
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(StorageFailedError, match="fsync of .* failed"):
        atomic_write(tmp_path / "file.bin", b"data")
    assert len(calls) == 1 and not (tmp_path / "file.bin").exists()


def test_stale_temp_files_of_one_name_are_removed(tmp_path):
    (tmp_path / ".a.json.tmp-123").write_text("half")
    (tmp_path / ".b.json.tmp-123").write_text("other file's")
    remove_stale_temp_files(tmp_path, "a.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.json.tmp-123"]


def test_device_words():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SegsearchError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SegsearchError, match="CUDA is not available"):
            resolve_device("cuda")
