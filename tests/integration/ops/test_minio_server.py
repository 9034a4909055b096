"""The local MinIO: real erasure coding over 4 drives, restart, clean failure."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from cluster.ops.minio import MinioServer, MinioServerError
from workers.objects import store

MiB = 1024 * 1024


def _object_dirs(server: MinioServer, bucket: str, key: str) -> list[Path]:
    return [drive / bucket / key for drive in server.drive_dirs]


def test_objects_are_erasure_coded_over_four_drives(minio: MinioServer) -> None:
    assert [drive.name for drive in minio.drive_dirs] == ["drive1", "drive2", "drive3", "drive4"]
    settings = minio.settings
    store.ensure_bucket(settings, "erasure-check")
    data = os.urandom(2 * MiB)  # large enough not to be inlined into xl.meta
    store.put(settings, "erasure-check", "series/object.bin", data)

    shard_bytes = []
    for directory in _object_dirs(minio, "erasure-check", "series/object.bin"):
        assert (directory / "xl.meta").is_file(), f"no xl.meta on {directory}"
        parts = list(directory.glob("*/part.1"))
        assert len(parts) == 1, f"expected one shard file under {directory}"
        shard_bytes.append(parts[0].stat().st_size)
    # EC:2 on 4 drives: 2 data + 2 parity shards, each about half the object.
    for size in shard_bytes:
        assert MiB <= size < MiB + 64 * 1024
    assert sum(shard_bytes) >= 2 * len(data)

    # Losing as many drives as there are parity shards loses nothing.
    for directory in _object_dirs(minio, "erasure-check", "series/object.bin")[:2]:
        shutil.rmtree(directory)
    assert store.get(settings, "erasure-check", "series/object.bin") == data


def test_restart_over_the_same_directory_keeps_objects(tmp_path: Path) -> None:
    server = MinioServer(tmp_path / "minio", drives=4)
    with server:
        first = server.settings
        store.ensure_bucket(first, "restart-check")
        store.put(first, "restart-check", "kept", b"still here")
    assert not server.running
    credentials = tmp_path / "minio" / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600

    with server:
        second = server.settings
        assert (second.access_key, second.secret_key) == (first.access_key, first.secret_key)
        assert store.get(second, "restart-check", "kept") == b"still here"
    assert not server.running


def test_failed_start_leaves_no_process(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MinioServer(tmp_path / "minio", drives=4, port=taken.getsockname()[1])
        with pytest.raises(MinioServerError) as raised:
            server.start()
    assert raised.value.reason in {"exited", "start_timeout"}
    assert "minio.log" in str(raised.value)
    assert not server.running
