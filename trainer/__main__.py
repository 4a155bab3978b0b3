"""`python -m segsearch.trainer train|eval FLAGS`: the trainer's commands as a module, so that
torchrun can launch data-parallel training:

    torchrun --nproc-per-node 2 -m segsearch.trainer train --out runs/ddp ...

Same flags, output and exit codes as `segsearch train` / `segsearch eval`. Ranks other than 0
log warnings only, so that each message appears once.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from segsearch.errors import SegsearchError
from segsearch.trainer.cli import add_eval_parser, add_train_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m segsearch.trainer",
                                     description="Train (also under torchrun) or evaluate SPML embeddings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=level if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    try:
        return args.handler(args)
    except SegsearchError as error:
        print(f"segsearch {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
