"""Generate the gRPC stubs in cluster/rpc from proto/ (``make proto``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "strata" / "v1" / "strata.proto"


def generate(out_dir: Path) -> None:
    """Write the message and service stubs (and their .pyi types) under out_dir/cluster/rpc."""
    (out_dir / "cluster" / "rpc").mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    # The -I mapping makes the generated imports read `from cluster.rpc import strata_pb2`.
    plugins = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{include}",
        f"-Icluster/rpc={PROTO.parent}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        str(PROTO),
    ]
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    generate(ROOT)
    print(f"generated {ROOT / 'cluster' / 'rpc'}")
