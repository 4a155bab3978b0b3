"""Regenerate the committed Python code of `protos/segsearch/v1/segment_search.proto`.

Why committed rather than generated at install time: an installed segsearch then needs
neither `grpcio-tools` nor a build step, and a reader sees the exact code that runs. The
cost is drift, so `tests/service/test_proto_current.py` regenerates into a temporary
directory and requires byte-identical files. After editing the .proto run

    python -m segsearch.service.proto_build

The code is generated with `-I protos`, so the descriptor keeps its public name
`segsearch/v1/segment_search.proto` (what reflection shows and other languages import),
and the one absolute import protoc writes into the gRPC stubs (`from segsearch.v1 import
...`, a package that does not exist here) is rewritten to `segsearch.service._generated`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_NAME = "segsearch/v1/segment_search.proto"
GENERATED = ("segment_search_pb2.py", "segment_search_pb2.pyi", "segment_search_pb2_grpc.py")
SERVICE_DIR = Path(__file__).resolve().parent
GENERATED_DIR = SERVICE_DIR / "_generated"
REPO_ROOT = SERVICE_DIR.parent
PROTOS_DIR = REPO_ROOT / "protos"
_PROTOC_IMPORT = "from segsearch.v1 import segment_search_pb2"
_PACKAGE_IMPORT = "from segsearch.service._generated import segment_search_pb2"


def generate(out_dir: Path, protos_dir: Path = PROTOS_DIR) -> list[Path]:
    """Run protoc (from grpcio-tools) and write the three files of GENERATED into out_dir."""
    from grpc_tools import protoc  # build-time only: not imported by the running service

    proto = protos_dir / PROTO_NAME
    if not proto.is_file():
        raise FileNotFoundError(f"{proto} not found; run from a segsearch source checkout")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as raw:
        args = ["protoc", f"-I{protos_dir}", f"--python_out={raw}", f"--pyi_out={raw}",
                f"--grpc_python_out={raw}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        written = []
        for name in GENERATED:
            text = (Path(raw) / "segsearch" / "v1" / name).read_text()
            target = out_dir / name
            target.write_text(text.replace(_PROTOC_IMPORT, _PACKAGE_IMPORT))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GENERATED_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as staging:
        for path in generate(Path(staging)):
            shutil.copyfile(path, args.out / path.name)
            print(f"wrote {args.out / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
