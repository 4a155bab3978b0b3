"""`python -m segsearch.trainer train|eval FLAGS`: the trainer's commands as a module, so that
torchrun can launch data-parallel training:

    torchrun --nproc-per-node 2 -m segsearch.trainer train --out runs/ddp ...

It is `segsearch` itself (same flags, output and exit codes as `segsearch train` / `segsearch
eval`), whose logging setup already knows torchrun's ranks.
"""
from __future__ import annotations

import sys

from segsearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
