"""Where each tier's objects live: the node's own MinIO (bucket ``strata-<tier>``) unless
the ``tier_locations`` file says otherwise, for example cold in a second deployment:

    [cold]
    endpoint = "archive.example.org:9000"   # HOST:PORT of an S3 endpoint
    bucket = "strata-cold"
    secure = true                           # TLS; required off 127.0.0.1
    access_key_env = "STRATA_COLD_ACCESS_KEY"   # the credentials come from the
    secret_key_env = "STRATA_COLD_SECRET_KEY"   # environment, never from the file

    [warm]
    bucket = "strata-warm-ia"               # the node's own MinIO, another bucket

Why configuration and not the policy: objects already written stay where they are when a
policy changes, so the place of a tier must not change with the policy file. Mistakes
are refused with the tier and the field named.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cluster.config import TIERS
from cluster.security.exposure import is_loopback
from workers.records import StoreSettings, TierLocation

_FIELDS = {"endpoint", "bucket", "secure", "access_key_env", "secret_key_env", "region"}


class LocationError(Exception):
    """A tier_locations file that cannot be used; names the tier and the field."""


def load_locations(path: Path, node_store: StoreSettings | None) -> tuple[TierLocation, ...]:
    """The tiers the file places (the others stay in ``node_store``'s strata-<tier>).
    ``node_store`` may be None when only checking the file (no MinIO started yet)."""
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise LocationError(f"tier_locations: {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise LocationError(f"tier_locations: {path} is not valid TOML: {error}") from None
    found = []
    for tier, table in document.items():
        where = f"{path.name}: [{tier}]"
        if tier not in TIERS:
            raise LocationError(f"{where}: no such tier (one of {', '.join(TIERS)})")
        if not isinstance(table, Mapping):
            raise LocationError(f"{where} must be a table")
        unknown = sorted(set(table) - _FIELDS)
        if unknown:
            known = ", ".join(sorted(_FIELDS))
            raise LocationError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {known})")
        found.append(_location(tier, table, where, node_store))
    # Two tiers in one bucket of one store would make a move copy an object onto itself
    # and then delete it as its source: refused.
    placed = {where.tier: (where.store.endpoint, where.bucket) for where in found}
    seen: dict[tuple[str, str], str] = {}
    for tier in TIERS:
        here = placed.get(tier, (node_store.endpoint if node_store else "", f"strata-{tier}"))
        if here in seen:
            raise LocationError(
                f"{path.name}: tiers {seen[here]} and {tier} are both in bucket {here[1]!r} "
                "of one store; each tier needs its own"
            )
        seen[here] = tier
    return tuple(found)


def _location(
    tier: str, table: Mapping[str, Any], where: str, node_store: StoreSettings | None
) -> TierLocation:
    bucket = table.get("bucket", f"strata-{tier}")
    if not isinstance(bucket, str) or not bucket:
        raise LocationError(f"{where} bucket must be a bucket name, not {bucket!r}")
    endpoint = table.get("endpoint")
    if endpoint is None:
        if set(table) - {"bucket"}:
            raise LocationError(f"{where}: credentials and TLS need an endpoint")
        store = node_store or StoreSettings("", "", "")
        return TierLocation(tier, store, bucket)
    if not isinstance(endpoint, str) or ":" not in endpoint or "/" in endpoint:
        raise LocationError(f"{where} endpoint must be HOST:PORT, not {endpoint!r}")
    secure = table.get("secure", False)
    if not isinstance(secure, bool):
        raise LocationError(f"{where} secure must be true or false, not {secure!r}")
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    if not secure and not is_loopback(host):
        raise LocationError(
            f"{where}: endpoint {endpoint} is not on this machine, so it needs secure = true "
            "(TLS): image data never travels in the clear"
        )
    credentials = []
    for field in ("access_key_env", "secret_key_env"):
        name = table.get(field)
        if not isinstance(name, str) or not name:
            raise LocationError(f"{where} needs {field}, the environment variable holding it")
        value = os.environ.get(name)
        if not value:
            raise LocationError(f"{where} {field}: the environment has no {name}")
        credentials.append(value)
    region = table.get("region", "us-east-1")
    if not isinstance(region, str):
        raise LocationError(f"{where} region must be text, not {region!r}")
    return TierLocation(
        tier, StoreSettings(endpoint, credentials[0], credentials[1], secure, region), bucket
    )
