"""Placements: where each stored object lives now, and which key wraps its data key.

An instance's first placement is its row in ``instances`` (the whole object, its
``object_key`` in the bucket of its tier, wrapped by ``key_id``). A tier move or a key
rotation appends a row to the ``placements`` table (append-only, partitioned by
``placed_date``) with ``CatalogWriter.place``; the latest row for a SHA-256 wins, in the
writer's index (retrieval follows it at once) and for analysts (docs/catalog.md). History
is never rewritten: a move costs one small append, and where an object was on any day
remains a query.

A study deleted at the end of its retention is placed nowhere: each instance's last
placement is in the tier ``deleted`` (no bucket, no object, no key), with the rule that
ended it in ``reason``. That row is the catalog's record of the deletion; the searches
and lookups of the doors no longer find the study, and its keys objects are gone from
the store (crypto-shredding: ``cluster.tiering.apply``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

DELETED = "deleted"  # the tier of an instance whose study's retention ended
DELETED_MESSAGE = (
    "this instance's study was deleted at the end of its retention (its keys destroyed); "
    "it cannot be read, and a copy sent again is not stored"
)

PLACEMENTS_SCHEMA = pa.schema(
    [
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("sop_instance_uid", pa.string(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("study_instance_uid", pa.string(), nullable=False),
        pa.field("tier", pa.string(), nullable=False),
        pa.field("bucket", pa.string(), nullable=False),
        pa.field("object_key", pa.string(), nullable=False),
        pa.field("byte_offset", pa.int64(), nullable=False),
        pa.field("byte_length", pa.int64(), nullable=False),
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("placed_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("placed_date", pa.date32(), nullable=False),
        # Added later (null in older rows: the instance's own): the transfer syntax the
        # object holds there, which a tier's own codec changes.
        pa.field("transfer_syntax_stored", pa.string(), nullable=True),
    ]
)
LATER_PLACEMENT_COLUMNS = ("transfer_syntax_stored",)


@dataclass(frozen=True)
class Placement:
    """Where one stored object lives now, and which key-encryption key wraps its data key.

    An instance's first placement is its row in ``instances`` (the whole object,
    ``object_key`` in its tier's bucket); a tier move or a key rotation appends a
    ``Placement`` to the ``placements`` table, and the latest one for a SHA-256 wins.
    History is never rewritten.
    """

    sha256: str
    sop_instance_uid: str
    version: int
    study_instance_uid: str
    tier: str
    bucket: str
    object_key: str
    byte_offset: int
    byte_length: int
    key_id: str
    reason: str
    placed_time: datetime
    transfer_syntax_stored: str = ""  # what the object holds there ("" for a deletion)


def placements_table(placements: Iterable[Placement]) -> pa.Table:
    rows = []
    for placement in placements:
        row = dataclasses.asdict(placement)
        moment = placement.placed_time  # naive means UTC, as everywhere in the catalog
        row["placed_time"] = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
        row["placed_date"] = row["placed_time"].date()
        row["transfer_syntax_stored"] = placement.transfer_syntax_stored or None
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=PLACEMENTS_SCHEMA)


def deletion(
    sha256: str,
    sop_instance_uid: str,
    version: int,
    study_instance_uid: str,
    reason: str,
    placed_time: datetime,
) -> Placement:
    """The placement that records an instance deleted (its data key destroyed)."""
    return Placement(
        sha256,
        sop_instance_uid,
        version,
        study_instance_uid,
        DELETED,
        "",
        "",
        0,
        0,
        "",
        reason,
        placed_time,
    )
