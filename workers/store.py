"""Reading and writing objects in the S3-compatible store (MinIO), one bucket per tier."""

from __future__ import annotations

import io
from functools import lru_cache

from minio import Minio
from minio.error import S3Error

from workers.records import StoreSettings


def tier_bucket(tier: str) -> str:
    """The bucket that holds a tier's objects."""
    return f"strata-{tier}"


@lru_cache(maxsize=8)
def client(settings: StoreSettings) -> Minio:
    """One client per worker process and store; the client pools its connections."""
    return Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=settings.secure,
        region=settings.region,
    )


def ensure_bucket(settings: StoreSettings, bucket: str) -> None:
    """Create ``bucket`` if it does not exist yet."""
    minio = client(settings)
    try:
        minio.make_bucket(bucket)
    except S3Error as error:
        if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def put(settings: StoreSettings, bucket: str, key: str, data: bytes) -> None:
    """Write one object; returns only once MinIO has acknowledged it (quorum written)."""
    client(settings).put_object(
        bucket, key, io.BytesIO(data), len(data), content_type="application/octet-stream"
    )


def get(settings: StoreSettings, bucket: str, key: str, offset: int = 0, length: int = 0) -> bytes:
    """Read a whole object, or ``length`` bytes from ``offset``."""
    response = client(settings).get_object(bucket, key, offset=offset, length=length)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def exists(settings: StoreSettings, bucket: str, key: str) -> bool:
    """Whether ``key`` is in ``bucket``."""
    try:
        client(settings).stat_object(bucket, key)
    except S3Error as error:
        if error.code in ("NoSuchKey", "NoSuchObject"):
            return False
        raise
    return True
