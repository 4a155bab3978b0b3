"""Suite-wide options: `--runslow` runs the long variants (soak, big fuzz, long load runs)
that the default run leaves out so that it stays within minutes on 2 cores."""
from __future__ import annotations

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
