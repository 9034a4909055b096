"""workers.objects.store against a real 4-drive MinIO (EC:2) when objects or the server are lost.

An object damaged beyond its parity must be answered with ObjectUnreadableError (DATA_LOSS)
at once, not after MinIO's "Retry-After: 60" on every retry; drives offline and a stopped
MinIO must give StoreUnavailableError, without the address in the message. pytest-timeout
turns a hang into a failure; elapsed times are printed, not asserted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.ops.minio import MinioServer
from workers.objects import store
from workers.objects.store import ObjectUnreadableError, StoreUnavailableError
from workers.records import StoreSettings

pytestmark = [pytest.mark.integration]

MiB = 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def _fresh_clients() -> Iterator[None]:
    """Clients of stopped servers are not left in the cache for later modules."""
    yield
    store.client.cache_clear()
    store.http_pool.cache_clear()


def _key(data: bytes) -> str:
    """A key shaped like the pipeline's: hashes only."""
    return f"objects/{hashlib.sha256(data).hexdigest()}"


def _object_dirs(server: MinioServer, bucket: str, key: str) -> list[Path]:
    directories = [drive / bucket / key for drive in server.drive_dirs]
    for directory in directories:
        assert (directory / "xl.meta").is_file(), f"no xl.meta in {directory}"
        assert len(list(directory.glob("*/part.1"))) == 1, f"not one shard in {directory}"
    return directories


def _raises(error_type: type[store.StoreError], call: Callable[[], object]) -> store.StoreError:
    started = time.monotonic()
    with pytest.raises(error_type) as raised:
        call()
    print(f"{type(raised.value).__name__} after {time.monotonic() - started:.2f} s: {raised.value}")
    return raised.value


def _stored(settings: StoreSettings, bucket: str, size: int) -> tuple[str, bytes]:
    store.ensure_bucket(settings, bucket)
    data = os.urandom(size)  # 1 MiB and more: shards in part files, not inlined in xl.meta
    key = _key(data)
    store.put(settings, bucket, key, data)
    assert store.get(settings, bucket, key) == data
    return key, data


@pytest.mark.timeout(60)
def test_object_gone_from_three_of_four_drives_is_data_loss(
    minio: MinioServer, bucket_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    key, _ = _stored(minio.settings, bucket_name, MiB)
    for directory in _object_dirs(minio, bucket_name, key)[:3]:
        shutil.rmtree(directory)

    # MinIO treats an object whose metadata is left on too few drives as dangling and
    # answers NoSuchKey; the catalog says it was stored, so it is lost.
    error = _raises(ObjectUnreadableError, lambda: store.get(minio.settings, bucket_name, key))
    assert isinstance(error, ObjectUnreadableError)
    assert (error.bucket, error.key) == (bucket_name, key)
    assert "NoSuchKey" in error.cause
    logged = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(logged) == 1
    assert key in logged[0] and bucket_name in logged[0] and "NoSuchKey" in logged[0]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_shards_lost_beyond_parity_are_data_loss_not_a_hang(
    minio: MinioServer, bucket_name: str
) -> None:
    key, _ = _stored(minio.settings, bucket_name, MiB)
    for directory in _object_dirs(minio, bucket_name, key)[:3]:
        for shard in directory.glob("*/part.1"):
            shard.unlink()

    # The metadata is intact, so the object still exists, but only one shard of the two
    # needed is left: MinIO answers 503 SlowDownRead with "Retry-After: 60".
    assert store.exists(minio.settings, bucket_name, key)
    error = _raises(ObjectUnreadableError, lambda: store.get(minio.settings, bucket_name, key))
    assert isinstance(error, ObjectUnreadableError)
    assert error.cause == "S3Error SlowDownRead (HTTP 503)"


@pytest.mark.timeout(60)
def test_bit_rot_in_a_later_block_is_data_loss_and_earlier_blocks_still_read(
    minio: MinioServer, bucket_name: str
) -> None:
    key, data = _stored(minio.settings, bucket_name, 4 * MiB)  # four 1 MiB erasure blocks
    for directory in _object_dirs(minio, bucket_name, key)[:3]:
        for shard in directory.glob("*/part.1"):
            damaged = bytearray(shard.read_bytes())
            for index in range(len(damaged) * 3 // 4, len(damaged), 512):
                damaged[index] ^= 0xFF
            shard.write_bytes(bytes(damaged))

    # MinIO sends the response head, then closes the connection at the block it cannot
    # decode: the body is cut short, on the second try too.
    error = _raises(ObjectUnreadableError, lambda: store.get(minio.settings, bucket_name, key))
    assert isinstance(error, ObjectUnreadableError)
    assert "cut short" in error.cause
    tail = _raises(
        ObjectUnreadableError, lambda: store.get(minio.settings, bucket_name, key, 3 * MiB, 1000)
    )
    assert "cut short" in tail.cause
    assert store.get(minio.settings, bucket_name, key, 0, MiB) == data[:MiB]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_drives_offline_make_reads_unavailable_not_data_loss(tmp_path: Path) -> None:
    with MinioServer(tmp_path / "minio", drives=4) as server:
        settings = server.settings
        key, _ = _stored(settings, "offline", MiB)
        for drive in server.drive_dirs[1:]:
            drive.rename(drive.with_name(f"{drive.name}.offline"))
        # For about a second MinIO answers NoSuchBucket, then SlowDownRead while its health
        # check reports no read quorum: neither says that the object is lost.
        error = _raises(StoreUnavailableError, lambda: store.get(settings, "offline", key))
        assert isinstance(error, StoreUnavailableError)
        assert "NoSuchBucket" in error.cause or "no read quorum" in error.cause


@pytest.fixture(scope="module")
def stopped_minio(tmp_path_factory: pytest.TempPathFactory) -> StoreSettings:
    """The settings of a MinIO of our own that held an object and has been stopped."""
    server = MinioServer(tmp_path_factory.mktemp("stopped-minio"), drives=4)
    with server:
        settings = server.settings
        store.ensure_bucket(settings, "stopped")
        store.put(settings, "stopped", "kept", b"written while it ran")
    assert not server.running
    return settings


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "operation",
    ["get", "put", "exists", "delete", "list_keys", "ensure_bucket"],
)
def test_a_stopped_store_is_unavailable_without_its_address(
    stopped_minio: StoreSettings, operation: str
) -> None:
    settings = stopped_minio
    calls: dict[str, Callable[[], object]] = {
        "get": lambda: store.get(settings, "stopped", "kept"),
        "put": lambda: store.put(settings, "stopped", "new", b"data"),
        "exists": lambda: store.exists(settings, "stopped", "kept"),
        "delete": lambda: store.delete(settings, "stopped", "kept"),
        "list_keys": lambda: list(store.list_keys(settings, "stopped")),
        "ensure_bucket": lambda: store.ensure_bucket(settings, "stopped"),
    }
    error = _raises(StoreUnavailableError, calls[operation])
    assert isinstance(error, StoreUnavailableError)
    assert error.endpoint == settings.endpoint
    assert "ECONNREFUSED" in error.cause
    message = str(error)
    assert "127.0.0.1" not in message and "http" not in message
    assert str(settings.endpoint.rsplit(":", 1)[1]) not in message


@pytest.mark.timeout(60)
def test_delete_and_list_keys_round_trip(minio: MinioServer, bucket_name: str) -> None:
    settings = minio.settings
    store.ensure_bucket(settings, bucket_name)
    store.ensure_bucket(settings, bucket_name)  # a second time is not an error
    keys = [f"series/{number:04d}" for number in range(5)]
    for key in keys:
        store.put(settings, bucket_name, key, key.encode())
    store.put(settings, bucket_name, "other/one", b"other")

    assert list(store.list_keys(settings, bucket_name, "series/")) == keys
    assert list(store.list_keys(settings, bucket_name)) == ["other/one", *keys]
    listed = list(store.list_objects(settings, bucket_name, "series/0000"))
    assert [(item.key, item.size) for item in listed] == [("series/0000", len(b"series/0000"))]
    assert listed[0].last_modified is not None

    store.delete(settings, bucket_name, keys[1])
    assert not store.exists(settings, bucket_name, keys[1])
    assert list(store.list_keys(settings, bucket_name, "series/")) == [keys[0], *keys[2:]]
    store.delete(settings, bucket_name, keys[1])  # deleting what is gone is not an error
    missing_bucket = _raises(
        StoreUnavailableError, lambda: store.delete(settings, bucket_name + "-none", keys[0])
    )
    assert "NoSuchBucket" in missing_bucket.cause
    # Reading it back (the catalog would say it is stored) is data loss.
    error = _raises(ObjectUnreadableError, lambda: store.get(settings, bucket_name, keys[1]))
    assert "NoSuchKey" in error.cause


@pytest.mark.timeout(60)
def test_listing_a_bucket_that_does_not_exist_is_an_error(
    minio: MinioServer, bucket_name: str
) -> None:
    error = _raises(
        StoreUnavailableError, lambda: list(store.list_keys(minio.settings, bucket_name))
    )
    assert "NoSuchBucket" in error.cause
