"""The `segsearch` command: one entry point, a subcommand per job.

User mistakes raise `SegsearchError`; they are printed as one line (no traceback) and the
command exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from segsearch import __version__
from segsearch.errors import SegsearchError


def build_parser() -> argparse.ArgumentParser:
    from segsearch.demo import add_demo_parser
    from segsearch.indexer.cli import add_index_parser
    from segsearch.service.cli import add_service_parsers
    from segsearch.trainer.cli import add_eval_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="segsearch", description="Segment retrieval with SPML embeddings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"segsearch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    add_index_parser(subparsers)
    add_service_parsers(subparsers)
    add_demo_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from segsearch.indexer.cli import normalize_index_argv

    argv = normalize_index_argv(sys.argv[1:] if argv is None else argv)  # `index CORPUS` -> `index build CORPUS`
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.handler(args)
    except SegsearchError as error:
        print(f"segsearch {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def configure_logging(verbose: bool) -> None:
    """INFO (DEBUG with -v); under torchrun, ranks other than 0 log warnings only, so that each
    message appears once, and every line names its rank."""
    level = logging.DEBUG if verbose else logging.INFO
    if not verbose:  # Dask's scheduler and workers narrate every step at INFO
        for noisy in ("distributed", "dask"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    rank = os.environ.get("RANK")
    if rank is None:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=level if rank == "0" else logging.WARNING,
                            format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
