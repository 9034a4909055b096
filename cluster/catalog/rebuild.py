"""Rebuilding a lost catalog from the objects in the store alone.

``rebuild_catalog`` lists every tier bucket, reads each object back into its row of
``instances`` (``workers.pipeline.recover``: header, manifest and prefix by ranged GETs), numbers
the versions, appends the rows to the ``instances`` table in batches, and then opens the
catalog writer on it, whose index derives and writes the ``studies`` rows as it does
whenever it is rebuilt. An object that cannot be read is reported by its key and left
out; the others are rebuilt. The store being unavailable stops the rebuild before
anything is written.

Run it with the node stopped: a running catalog writer would keep working from the index
of the lost catalog, and the orphan reconciler removes objects that no catalog row names.

What the objects cannot say, and what the rebuild assumes instead:

- ``version``: the writer numbered a SOP Instance's files in the order it committed them;
  the rebuild numbers them in the order of their ``ingest_time`` (when the pipeline stored
  each; ties broken by SHA-256). The orders agree unless two different files of one SOP
  Instance were in the pipeline at the same time and committed in the other order.
- ``studies.last_access_time`` is kept only in the catalog: null after a rebuild.
- ``tier`` is the tier of the bucket the object is in now and ``key_id`` the key that wraps
  it now: the values of ingest until tiering moves an object or a rotation re-wraps it.
- A file re-sent while the writer could not answer the duplicate check was stored again,
  in another pack; the rebuild keeps whichever copy it reads first (both hold the same
  bytes) and reports the other.
"""

from __future__ import annotations

import asyncio
import pickle
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from deltalake import write_deltalake
from deltalake.exceptions import DeltaError, TableNotFoundError

from cluster.catalog import journal
from cluster.catalog.schema import (
    DEFAULT_BUCKET,
    IDENTITY,
    INSTANCES,
    JOURNALED,
    STUDIES,
    TABLES,
    create_tables,
    identity_table,
    instances_table,
    open_table,
    utc,
)
from cluster.catalog.writer import CatalogWriter
from workers.dicom.identity import IdentityRow
from workers.errors import RejectError
from workers.objects import store
from workers.objects.envelope import EnvelopeError
from workers.objects.keys import FileKeyProvider, KeyFileError
from workers.pipeline.recover import (
    MemberFailure,
    RecoveredRow,
    UnreadableObjectError,
    is_pack,
    read_pack,
)
from workers.records import InstanceRecord, StoreSettings, TierLocation

# Objects read at once. The work is mostly waiting on ranged GETs (AES-GCM and zstd
# release the GIL), so threads in this process suffice and need no Ray: the node, and
# with it its Ray runtime, is stopped during a rebuild. Past what one machine's network
# reads in acceptable time, the same read_pack would run in Ray tasks, one per first-level
# key prefix (v2/<2 hex>/).
READERS = 16
_IN_FLIGHT = 4 * READERS  # submitted but not collected: bounds memory while listing
# Rows per Delta append: few commits, a few tens of MB of rows in memory at a time.
BATCH_ROWS = 50_000


class CatalogNotEmptyError(Exception):
    """The catalog to rebuild into already has rows (or cannot be read)."""


@dataclass(frozen=True)
class ObjectFailure:
    """An object left out of the rebuilt catalog, and why (never patient data)."""

    bucket: str
    key: str
    reason: str


@dataclass(frozen=True)
class RebuildProgress:
    """Counts so far; ``to_write`` is known once every object is read (0 before)."""

    listed: int = 0
    read: int = 0
    failed: int = 0
    to_write: int = 0
    written: int = 0


@dataclass(frozen=True)
class RebuildReport:
    """What a rebuild read and wrote."""

    objects_read: int  # packs listed and read, failures included
    rows_written: int  # to instances
    studies: int  # rows of studies afterwards
    copies_left_out: int  # later copies of files stored twice (members no row names)
    failures: tuple[ObjectFailure, ...]


def assign_versions(files: Iterable[tuple[str, datetime, str]]) -> dict[str, int]:
    """The version of each file, by SHA-256, from (SOP Instance UID, ingest_time, SHA-256).

    Per SOP Instance UID, 1 for the file stored first, n + 1 for each later one: the
    writer's numbering, with ingest_time standing for commit order (see the module).
    Files stored in the same microsecond are ordered by SHA-256, so that every rebuild
    numbers them alike.
    """
    by_sop: dict[str, list[tuple[datetime, str]]] = {}
    for sop_instance_uid, ingest_time, sha256 in files:
        by_sop.setdefault(sop_instance_uid, []).append((utc(ingest_time), sha256))
    versions: dict[str, int] = {}
    for stored in by_sop.values():
        for version, (_, sha256) in enumerate(sorted(stored), start=1):
            versions[sha256] = version
    return versions


async def _open_and_fold(writer: CatalogWriter) -> None:
    await writer.ready()
    await writer.flush_now(raise_errors=True)  # a rebuild with missing studies must say so
    await writer.close()


def existing_rows(settings: StoreSettings, bucket: str) -> dict[str, int]:
    """Rows of each catalog table in ``bucket`` that exists; raises CatalogNotEmptyError
    for a table that exists but cannot be read."""
    if not store.bucket_exists(settings, bucket):
        return {}
    counts = {}
    for table in TABLES:
        try:
            counts[table] = open_table(settings, bucket, table).to_pyarrow_dataset().count_rows()
        except TableNotFoundError:
            continue
        except (DeltaError, OSError) as error:
            raise CatalogNotEmptyError(
                f"the {table} table in catalog bucket {bucket!r} cannot be read "
                f"({type(error).__name__}); rebuild with --force to replace it"
            ) from None
    for table in JOURNALED:
        groups = sum(1 for _ in journal.entries(settings, bucket, table))
        if groups:
            counts[f"{table}'s journal"] = groups
    groups = sum(1 for _ in journal.groups(settings, bucket))
    if groups:
        counts["journal groups"] = groups
    return counts


def drop_tables(settings: StoreSettings, bucket: str) -> int:
    """Delete every catalog table and its journal from ``bucket``; returns the number of
    objects (data files, log entries, journal groups) deleted."""
    keys = [
        key
        for prefix in (*TABLES, journal.PREFIX)
        for key in store.list_keys(settings, bucket, f"{prefix}/")
    ]
    store.delete_many(settings, bucket, keys)
    return len(keys)


def rebuild_catalog(
    settings: StoreSettings,
    keys: FileKeyProvider,
    *,
    index_path: Path,
    tiers: Sequence[str],
    bucket: str = DEFAULT_BUCKET,
    force: bool = False,
    on_progress: Callable[[RebuildProgress], None] | None = None,
    locations: Sequence[TierLocation] = (),
) -> RebuildReport:
    """Rebuild ``instances`` and ``studies`` in ``bucket`` from the objects of ``tiers``.

    Refuses (CatalogNotEmptyError) a catalog whose tables hold rows, unless ``force``:
    then those tables are deleted first. ``index_path`` is the catalog writer's index
    file (the node's ``catalog-index/<bucket>.sqlite``), rebuilt here for the new tables.
    """
    counts = existing_rows(settings, bucket)
    if any(counts.values()):
        if not force:
            held = " and ".join(
                f"{rows} groups in {table}" if "journal" in table else f"{rows} rows in {table}"
                for table, rows in counts.items()
            )
            raise CatalogNotEmptyError(
                f"catalog bucket {bucket!r} already holds {held}; a rebuild would add every "
                "row again. Rebuild with --force to delete those tables first"
            )
        drop_tables(settings, bucket)
    tally = _Tally(on_progress or (lambda progress: None))
    index_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=index_path.parent, prefix="rebuild-") as scratch:
        staging = _Staging(Path(scratch) / "rows.sqlite")
        try:
            _read_objects(settings, keys, tiers, staging, tally, locations)
            staging.number_versions()
            _write_instances(settings, bucket, staging, tally)
        finally:
            staging.close()
    # The writer's index finds the new table, rebuilds itself from it, and folds every
    # study row it derives into the new studies table when closed.
    asyncio.run(_open_and_fold(CatalogWriter(settings, bucket, index_path=str(index_path))))
    studies = open_table(settings, bucket, STUDIES).to_pyarrow_dataset().count_rows()
    return RebuildReport(
        objects_read=tally.progress.read,
        rows_written=tally.progress.written,
        studies=studies,
        copies_left_out=tally.copies,
        failures=tuple(tally.failures),
    )


class _Tally:
    """Counts and failures, kept by the rebuild's own thread only."""

    def __init__(self, report: Callable[[RebuildProgress], None]) -> None:
        self.progress = RebuildProgress()
        self.failures: list[ObjectFailure] = []
        self.copies = 0
        self._report = report

    def add(self, **increments: int) -> None:
        values = {name: getattr(self.progress, name) + n for name, n in increments.items()}
        self.progress = replace(self.progress, **values)
        self._report(self.progress)


def _read_objects(
    settings: StoreSettings,
    keys: FileKeyProvider,
    tiers: Sequence[str],
    staging: _Staging,
    tally: _Tally,
    locations: Sequence[TierLocation] = (),
) -> None:
    pending: dict[Future[tuple[list[RecoveredRow], list[MemberFailure]]], tuple[str, str]] = {}

    def collect(done: Iterable[Future[tuple[list[RecoveredRow], list[MemberFailure]]]]) -> None:
        for future in done:
            bucket, key = pending.pop(future)
            error = future.exception()
            if isinstance(error, store.StoreUnavailableError):
                raise error  # the store's state, not this object's: stop, write nothing
            if error is not None:
                tally.failures.append(ObjectFailure(bucket, key, _reason(error)))
                tally.add(read=1, failed=1)
                continue
            rows, failed = future.result()
            for member in failed:
                where = f"{key}#{member.sha256}"
                tally.failures.append(ObjectFailure(bucket, where, member.reason))
            for row in rows:
                left_out = staging.add(row.record, row.identity)
                # A file stored twice (a resend while the duplicate check could not
                # answer): the copy stored first is kept, as the catalog kept it; the other
                # is a member no row names, not a failure.
                tally.copies += left_out is not None
            tally.add(read=1, failed=1 if failed else 0)

    with ThreadPoolExecutor(READERS, thread_name_prefix="strata-rebuild") as pool:
        try:
            placed = {where.tier: (where.store, where.bucket) for where in locations}
            for tier in tiers:
                # A tier in a bucket or store of its own (tier_locations), else strata-<tier>.
                source, bucket = placed.get(tier, (settings, store.tier_bucket(tier)))
                if not store.bucket_exists(source, bucket):
                    continue
                for listed in store.list_objects(source, bucket):
                    if not is_pack(listed.key):
                        continue  # a keys object: read with its pack
                    future = pool.submit(read_pack, source, bucket, listed, tier, keys)
                    pending[future] = (bucket, listed.key)
                    tally.add(listed=1)
                    if len(pending) >= _IN_FLIGHT:
                        collect(wait(pending, return_when=FIRST_COMPLETED).done)
            collect(wait(pending).done)
        finally:
            for future in pending:
                future.cancel()


def _reason(error: BaseException) -> str:
    """Why an object could not be read, in words that never hold patient data."""
    if isinstance(error, RejectError):
        return f"the stored file's header cannot be read: {error.message}"
    if isinstance(error, UnreadableObjectError | EnvelopeError | KeyFileError | store.StoreError):
        return str(error)
    return f"reading it failed with {type(error).__name__}"


def _write_instances(
    settings: StoreSettings, bucket: str, staging: _Staging, tally: _Tally
) -> None:
    """Append the staged rows to ``instances`` in ingest-time order (few files per
    ``ingest_date`` partition), ``BATCH_ROWS`` per commit."""
    create_tables(settings, bucket)
    table = open_table(settings, bucket, INSTANCES)
    identities = open_table(settings, bucket, IDENTITY)
    tally.add(to_write=staging.count())
    for batch in staging.batches(BATCH_ROWS):
        # Identity rows first, as the writer does: one is read only through its instance.
        rows = [(identity, utc(record.ingest_time).date()) for record, identity in batch]
        write_deltalake(identities, identity_table(rows), mode="append")
        write_deltalake(
            table,
            instances_table([record for record, _ in batch]),
            mode="append",
            schema_mode="merge",  # an older, empty table gains the later columns
        )
        tally.add(written=len(batch))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _microseconds(moment: datetime) -> int:
    return (utc(moment) - _EPOCH) // timedelta(microseconds=1)


class _Staging:
    """The rows read so far, in a scratch SQLite file: the rebuild's memory does not grow
    with the archive, and versions are numbered across buckets before anything is written."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path)
        # A scratch file, deleted after the rebuild: no journal, no fsync.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(
            "CREATE TABLE rows (sha256 TEXT PRIMARY KEY, sop_instance_uid TEXT NOT NULL, "
            "ingest_us INTEGER NOT NULL, object_key TEXT NOT NULL, version INTEGER NOT NULL, "
            "record BLOB NOT NULL);\n"
            "CREATE INDEX rows_sop ON rows (sop_instance_uid);\n"
            "CREATE INDEX rows_order ON rows (ingest_us, sha256);\n"
        )

    def add(self, record: InstanceRecord, identity: IdentityRow) -> str | None:
        """Stage one row and its identity row (as version 1). When a file with its SHA-256
        is staged already (the same file stored twice, in two packs), the copy stored
        first is kept, as the catalog kept it: the key of the pack whose copy is left out
        is returned."""
        row = (
            record.sha256,
            record.sop_instance_uid,
            _microseconds(record.ingest_time),
            record.object_key,
            pickle.dumps((record, identity)),
        )
        staged = self._db.execute(
            "SELECT ingest_us, object_key FROM rows WHERE sha256 = ?", (record.sha256,)
        ).fetchone()
        if staged is None:
            self._db.execute("INSERT INTO rows VALUES (?, ?, ?, ?, 1, ?)", row)
            return None
        if (staged[0], staged[1]) <= (row[2], row[3]):
            return record.object_key
        self._db.execute(
            "UPDATE rows SET ingest_us = ?, object_key = ?, record = ? WHERE sha256 = ?",
            (row[2], row[3], row[4], record.sha256),
        )
        return str(staged[1])

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM rows").fetchone()[0])

    def number_versions(self) -> None:
        """Number the files of every SOP Instance UID that has more than one."""
        several = self._db.execute(
            "SELECT sop_instance_uid FROM rows GROUP BY sop_instance_uid HAVING count(*) > 1"
        ).fetchall()
        with self._db:
            for (sop_instance_uid,) in several:
                files = self._db.execute(
                    "SELECT ingest_us, sha256 FROM rows WHERE sop_instance_uid = ?",
                    (sop_instance_uid,),
                ).fetchall()
                versions = assign_versions(
                    (sop_instance_uid, _EPOCH + timedelta(microseconds=us), sha256)
                    for us, sha256 in files
                )
                self._db.executemany(
                    "UPDATE rows SET version = ? WHERE sha256 = ?",
                    [(version, sha256) for sha256, version in versions.items()],
                )

    def batches(self, size: int) -> Iterator[list[tuple[InstanceRecord, IdentityRow]]]:
        """The staged rows with their versions and identity rows, oldest first, ``size`` at
        a time."""
        cursor = self._db.execute("SELECT record, version FROM rows ORDER BY ingest_us, sha256")
        while chunk := cursor.fetchmany(size):
            staged = [(pickle.loads(blob), version) for blob, version in chunk]
            yield [
                (replace(record, version=version), identity)
                for (record, identity), version in staged
            ]

    def close(self) -> None:
        self._db.close()
