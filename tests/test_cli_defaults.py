"""Every default a command-line flag shows is the default of the dataclass behind it: the CLIs
read them from the configs (each default written once), and this suite keeps it that way by
reading each subcommand's parser, so a flag that states its own literal default fails here."""
import argparse

import pytest

from segsearch.cli import build_parser
from segsearch.indexer.config import DaskConfig, IndexConfig
from segsearch.indexer.decode import DecodeConfig
from segsearch.service.config import MiB, BatchConfig, RouterConfig, ServerConfig, ServiceLimits
from segsearch.service.loadgen import LoadConfig
from segsearch.spml.config import SegmenterConfig
from segsearch.trainer.config import EvalConfig, TrainConfig
from segsearch.trainer.datasets import DataConfig

FRONTEND = {"max_message_mib": lambda c: c.max_message_bytes // MiB, "grace": "grace_seconds"}

# subcommand -> [(config, {flag dest: field name or function of the config})]; a dest not in
# the map is looked up under its own name.
SOURCES = {
    "train": [(TrainConfig(), {}), (DataConfig(), {})],
    "eval": [(EvalConfig(), {}), (DataConfig(), {})],
    "build": [(IndexConfig(), {"workers": "decode_workers"}), (DaskConfig(), {})],
    "add": [(IndexConfig(), {"workers": "decode_workers"})],
    "serve": [(ServerConfig(index_dir="", checkpoint=""), FRONTEND),
              (ServiceLimits(), {"embedding_cache_mib": lambda c: c.embedding_cache_bytes // MiB}),
              (BatchConfig(), {"batch_wait_ms": "max_wait_ms"})],
    "route": [(RouterConfig(), FRONTEND)],
    "load": [(LoadConfig(), {})],
}

# Defaults that belong to no config: where the CLI itself is the only place that knows them.
CLI_ONLY = {
    ("train", "out"), ("train", "data"), ("eval", "out"), ("eval", "data"), ("serve", "batch_max"),
    ("query", "top_k"), ("query", "labels"), ("query", "min_area"), ("query", "min_score"),
    ("query", "server"), ("query", "timeout"), ("query", "exclude_image"), ("query", "level"), ("segment", "num_segments"), ("segment", "server"),
    ("segment", "timeout"), ("load", "region_images"), ("load", "region_fraction"), ("load", "top_k"),
    ("load", "server"), ("demo", "workdir"), ("demo", "steps"), ("demo", "supervision"),
}

# The index's segmentation flags default to None ("the index's value"); their help states the default.
INDEX_HELP = {"max_side": DecodeConfig().max_side, "max_pixels": DecodeConfig().max_pixels,
              "embed_size": SegmenterConfig().embed_size, "grid": "{}x{}".format(*SegmenterConfig().grid),
              "kmeans_iterations": SegmenterConfig().iterations, "min_area": SegmenterConfig().min_area_fraction,
              "knn_k": SegmenterConfig().knn_k, "index_type": IndexConfig().index_type}


def subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every subcommand, nested ones (index build/add/...) by their last word."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from subparsers(sub)


def flag_defaults(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            yield action


def expected(command: str, dest: str):
    for config, mapping in SOURCES.get(command, []):
        source = mapping.get(dest, dest)
        if callable(source):
            return source(config)
        if hasattr(config, source):
            return getattr(config, source)
    raise KeyError(dest)


COMMANDS = dict(subparsers(build_parser()))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flag_defaults_come_from_the_configs(command):
    for action in flag_defaults(COMMANDS[command]):
        if (command, action.dest) in CLI_ONLY:
            continue
        try:
            want = expected(command, action.dest)
        except KeyError:
            pytest.fail(f"`segsearch {command} {action.option_strings[0]}` has its own default "
                        f"{action.default!r}: take it from a config dataclass (or list it in CLI_ONLY)")
        assert action.default == want, (command, action.dest)


@pytest.mark.parametrize("command", ["build", "add"])
def test_index_help_states_the_config_defaults(command):
    actions = {action.dest: action for action in COMMANDS[command]._actions}
    for dest, value in INDEX_HELP.items():
        assert actions[dest].default is None  # omitted: the index's own value
        assert f"(default {value}" in actions[dest].help, (dest, actions[dest].help)


def test_every_help_renders():
    for name, parser in COMMANDS.items():
        assert parser.format_help(), name
