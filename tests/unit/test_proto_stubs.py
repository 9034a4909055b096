"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

from pathlib import Path

from cluster.dev import protogen


def test_stubs_are_fresh(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    committed = protogen.ROOT / "cluster" / "rpc"
    for name in ("strata_pb2.py", "strata_pb2.pyi", "strata_pb2_grpc.py", "strata_pb2_grpc.pyi"):
        fresh = (tmp_path / "cluster" / "rpc" / name).read_text()
        assert (committed / name).read_text() == fresh, f"{name} is stale: run `make proto`"
