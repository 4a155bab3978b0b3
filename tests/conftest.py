"""Suite-wide options and fixtures: `--runslow` runs the long variants (soak, big fuzz, long
load runs) that the default run leaves out so that it stays within minutes on 2 cores;
`small_disk` is a real size-limited filesystem for the disk-full tests."""
from __future__ import annotations

import subprocess

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (long load, soak and fuzz variants)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="long variant: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session", autouse=True)
def feature_cache_of_this_run(tmp_path_factory):
    """Training's on-disk feature cache in this run's temp folder, not the user's home."""
    import os

    previous = os.environ.get("SEGSEARCH_CACHE_DIR")
    os.environ["SEGSEARCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if previous is None:
        os.environ.pop("SEGSEARCH_CACHE_DIR", None)
    else:
        os.environ["SEGSEARCH_CACHE_DIR"] = previous


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (root only; skips elsewhere), unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:  # lazily if a failed test left a file open there
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)
