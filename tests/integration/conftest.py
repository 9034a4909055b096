"""Shared fixtures for integration tests: a real 4-drive MinIO and a local Ray.

Every test under tests/integration is marked ``integration`` here, so
``pytest -m "not integration"`` selects the unit tests alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from cluster.minio_server import MinioServer
from cluster.ray_runtime import init_local_ray
from tests.integration.node import Node

_HERE = Path(__file__).parent
MiB = 1024 * 1024
# The shared node's admission limits, small enough for tests to reach them.
NODE_MAX_FILE = 32 * MiB
NODE_INFLIGHT = 96 * MiB


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinioServer]:
    """One MinIO over 4 drive directories (EC:2) for the whole session."""
    server = MinioServer(tmp_path_factory.mktemp("minio"), drives=4)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs, shut down at the end if this fixture started it."""
    started = not ray.is_initialized()
    if started:
        init_local_ray(address=None, num_cpus=2, namespace=None)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@pytest.fixture
def bucket_name() -> str:
    """A fresh bucket name, so tests sharing one MinIO do not see each other's data."""
    return f"test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One real `strata serve --embedded` process (Ray + 4-drive MinIO) for the session."""
    node = Node(
        tmp_path_factory.mktemp("node"),
        max_file_bytes=str(NODE_MAX_FILE),
        max_inflight_bytes=str(NODE_INFLIGHT),
        fanout_min_bytes=str(MiB),  # so that test_multiframe's 3 MB instance fans out
    )
    node.start()
    try:
        yield node
    finally:
        node.stop()
