"""The catalog's journal: each group commit's rows, durable in MinIO before any answer.

A group commit writes the rows it adds, to every table, as one small object,
``journal/group/<seq>.arrows`` in the catalog bucket, where ``seq`` is the group's
number: it only grows, and the writer never gives it twice. The object is an Arrow IPC
stream of (table, data) rows, ``data`` being that table's rows as an Arrow IPC stream of
their own. Once that PUT returns, the rows are as durable as the objects they describe
(MinIO's erasure coding), and the writer answers its callers. One object per group, not
one per table: a group that adds instances also adds their identity rows, and two PUTs in
turn cost a second MinIO round trip (~15 ms under DIMSE ingest) before every answer,
which a sender that waits for each answer pays in full; one object also lands or fails
whole, so an identity row never lands without its instance row. Writers before this
wrote ``journal/<table>/<seq>.arrows`` per table; those are still read.

In the background the writer appends the journal to each Delta table in large files
(``CatalogWriter.flush_now``), each Delta commit recording the last group it holds as a
transaction id (app ``JOURNAL_APP``, version ``seq``), and then deletes the group objects
whose rows every table holds.

Why: a Delta commit per group cost ~45 ms plus ~0.35 ms per file the table holds
(delta-rs 1.6), and every group left a small file that compaction rewrote, so that the
table held each row twice for the whole time-travel window. One PUT costs the same at
any size of the archive, each row reaches Delta once, in a file that need not be
rewritten, and the journal holds only what is not flushed yet.

The journal lives beside the tables, not inside them: a "full" vacuum deletes every file
in a table's folder that its log does not name.

Why Arrow IPC and not Parquet: a journal object is written once, read once by the flush
and deleted, so Parquet's encodings and statistics buy nothing there, and writing a
Parquet file of a few rows cost more CPU than the rest of a group commit (about half of
the writer's time under DIMSE ingest, profiled with py-spy). Objects an older writer
left as Parquet (``.parquet``) are still read.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from workers.objects import store
from workers.records import StoreSettings

PREFIX = "journal"
GROUPS = "group"  # journal/group/<seq>: a group's rows of every table (not a table name)
# The Delta transaction id of a flush: app and, as its version, the last group flushed.
JOURNAL_APP = "strata-journal"
_DIGITS = 20


class Entry(NamedTuple):
    """One journal object: the group that wrote it, and its key."""

    seq: int
    key: str


_SUFFIXES = (".arrows", ".parquet")  # what this writer writes, and what older ones did
_PARQUET_MAGIC = b"PAR1"


def key(table: str, seq: int) -> str:
    """The key of group ``seq``'s rows of ``table``."""
    return f"{PREFIX}/{table}/{seq:0{_DIGITS}d}{_SUFFIXES[0]}"


def encode(rows: pa.Table) -> bytes:
    """``rows`` as the bytes of a journal object (an Arrow IPC stream)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return bytes(sink.getvalue())


def decode(data: bytes, schema: pa.Schema) -> pa.Table:
    """The rows of a journal object, in ``schema`` (a nullable column added to the schema
    since the object was written reads as null)."""
    if data[:4] == _PARQUET_MAGIC:
        return pq.read_table(io.BytesIO(data), schema=schema)
    rows = pa.ipc.open_stream(data).read_all()
    for field in schema:
        if field.name not in rows.schema.names and field.nullable:
            rows = rows.append_column(field, pa.nulls(rows.num_rows, field.type))
    return rows.select(schema.names).cast(schema)


_GROUP_SCHEMA = pa.schema([("table", pa.string()), ("data", pa.binary())])


def encode_group(parts: dict[str, bytes]) -> bytes:
    """The bytes of one group's object: each table's rows (``encode``d), by table name."""
    rows = pa.table({"table": list(parts), "data": list(parts.values())}, schema=_GROUP_SCHEMA)
    return encode(rows)


def decode_group(data: bytes) -> dict[str, bytes]:
    """Each table's rows (``encode``d) in one group's object, by table name."""
    rows = pa.ipc.open_stream(data).read_all()
    return dict(zip(rows.column("table").to_pylist(), rows.column("data").to_pylist(), strict=True))


def write_group(settings: StoreSettings, bucket: str, seq: int, data: bytes) -> None:
    """Write group ``seq``'s object; returns once MinIO holds it (quorum)."""
    store.put(settings, bucket, key(GROUPS, seq), data)


def group_landed(settings: StoreSettings, bucket: str, seq: int) -> bool:
    """Whether group ``seq``'s object is in the store (after a PUT whose answer was
    lost). Raises StoreError when the store cannot say."""
    return store.exists(settings, bucket, key(GROUPS, seq))


def groups(settings: StoreSettings, bucket: str, after: int = 0) -> Iterator[Entry]:
    """The group objects with a number above ``after``, in order."""
    return entries(settings, bucket, GROUPS, after)


def pending(
    settings: StoreSettings, bucket: str, table: str, after: int = 0
) -> Iterator[tuple[int, bytes]]:
    """(seq, rows of ``table`` as ``encode``d) for every group above ``after`` that holds
    rows of ``table``: in group objects and in the per-table objects of older writers.
    Raises ObjectUnreadableError when an object listed is gone before it is read (a
    flush deleted it meanwhile)."""
    found: list[tuple[int, bytes]] = []
    for entry in entries(settings, bucket, table, after):
        found.append((entry.seq, read_bytes(settings, bucket, entry)))
    for entry in groups(settings, bucket, after):
        part = decode_group(read_bytes(settings, bucket, entry)).get(table)
        if part is not None:
            found.append((entry.seq, part))
    return iter(sorted(found, key=lambda found_one: found_one[0]))


def delete_groups(settings: StoreSettings, bucket: str, seqs: list[int]) -> None:
    """Delete the group objects numbered ``seqs`` (every table's rows in them flushed)."""
    store.delete_many(settings, bucket, [key(GROUPS, seq) for seq in seqs])


def read_bytes(settings: StoreSettings, bucket: str, entry: Entry) -> bytes:
    return store.get(settings, bucket, entry.key)


def entries(settings: StoreSettings, bucket: str, table: str, after: int = 0) -> Iterator[Entry]:
    """The journal objects of ``table`` with a group number above ``after``, in order.

    Keys of other shapes under the prefix are skipped: nothing but the writer puts
    objects there."""
    prefix = f"{PREFIX}/{table}/"
    for listed in store.list_objects(settings, bucket, prefix):
        name = listed.key.removeprefix(prefix)
        number = name.split(".", 1)[0]
        suffix = name[len(number) :]
        if len(number) == _DIGITS and number.isdigit() and suffix in _SUFFIXES:
            seq = int(number)
            if seq > after:
                yield Entry(seq, listed.key)


def delete_through(settings: StoreSettings, bucket: str, table: str, seq: int) -> int:
    """Delete the per-table journal objects of ``table`` (an older writer's) up to group
    ``seq`` (flushed); returns how many there were."""
    flushed = [entry.key for entry in entries(settings, bucket, table) if entry.seq <= seq]
    store.delete_many(settings, bucket, flushed)
    return len(flushed)
