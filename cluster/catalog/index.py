"""The catalog's keyed lookups: by SHA-256 (the duplicate check) and by SOP Instance UID
(retrieval), and each study's row, from a SQLite file on the catalog writer's disk.

A study's row is derived from its instances in the index whenever rows of it are added,
in the same transaction, and is marked dirty (a counter, so that a change made while an
older one is being written is not lost) until the writer has written it to the Delta
``studies`` table; a crash between the two loses nothing, the dirty mark survives it.

The Delta tables stay the truth; this index is derived from them and can always be rebuilt.
It records the version of ``instances`` it has seen, in the same transaction as the rows:
when the writer starts, it reads only the files added to the table since then (the rows
of a commit whose index update was cut off by a crash, or of another writer), and when the
file is lost, damaged, or belongs to another table, it is rebuilt from the whole table.

Why SQLite: B-tree lookups by key in microseconds on the request path, durable, in the
standard library, and its memory is its page cache (``CACHE_KIB``), not the archive: the
writer no longer holds a dictionary of every instance (measured ~470 bytes each). On disk
it costs about the size of a row of ``instances`` per instance.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pyarrow.dataset as pa_dataset
from deltalake import DeltaTable

from cluster.catalog.schema import (
    RECORD_FIELDS,
    StudyRow,
    derive_study,
    record_from_row,
    study_from_row,
    utc,
)
from workers.records import InstanceRecord

log = logging.getLogger("strata.catalog")

# The index's own schema; a file with another one is rebuilt.
FORMAT = 1
CACHE_KIB = 64 * 1024  # SQLite's page cache: the index's whole memory
_BATCH = 50_000

_COLUMNS = (*RECORD_FIELDS, "ingest_date")


def _sql_type(name: str) -> str:
    return "INTEGER" if name in _INTEGERS else "TEXT"


_INTEGERS = {
    "frames",
    "rows",
    "columns",
    "bits_allocated",
    "bits_stored",
    "samples_per_pixel",
    "bytes_in",
    "bytes_stored",
    "version",
}


class CatalogIndex:
    """Instances by SHA-256 and by SOP Instance UID, and the Delta version they reflect."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        table: DeltaTable,
        options: dict[str, str],
        studies: Callable[[], Iterable[StudyRow]] = tuple,
    ) -> CatalogIndex:
        """The index at ``path``, brought up to date with ``table`` (rebuilt if needed).

        ``studies`` reads the Delta ``studies`` table, for a rebuild: what the instances
        cannot tell (last access) is taken from it, and only rows that differ from it
        are marked dirty."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        started = time.monotonic()
        try:
            index = cls(_connect(path))
            how = index.catch_up(table, options, studies)
        except (sqlite3.DatabaseError, _StaleError) as error:
            log.warning("catalog index %s is rebuilt from the table: %s", path.name, error)
            for leftover in (path, path.with_name(path.name + "-wal")):
                leftover.unlink(missing_ok=True)
            path.with_name(path.name + "-shm").unlink(missing_ok=True)
            index = cls(_connect(path))
            how = index._rebuild(table, studies)
        log.info(
            "catalog index ready in %.1f s (%s; %d instances)",
            time.monotonic() - started,
            how,
            index.count(),
        )
        return index

    def close(self) -> None:
        self._db.close()

    def catch_up(
        self,
        table: DeltaTable,
        options: dict[str, str],
        studies: Callable[[], Iterable[StudyRow]] = tuple,
    ) -> str:
        """Read the rows of files added to ``table`` since the version the index reflects
        (rebuilding it when it has none); says what it did. Raises _StaleError when the
        index cannot be caught up (see ``open``)."""
        meta = self._meta()
        if not meta:
            return self._rebuild(table, studies)
        if meta.get("format") != str(FORMAT):
            raise _StaleError(f"it has format {meta.get('format')}, not {FORMAT}")
        if meta.get("table_id") != _table_id(table):
            raise _StaleError("it was built from another table")
        seen = int(meta["version"])
        current = table.version()
        if seen == current:
            return "up to date"
        if seen > current:
            raise _StaleError(f"it has seen version {seen}, the table is at {current}")
        try:
            before = DeltaTable(table.table_uri, version=seen, storage_options=options)
        except Exception as error:  # noqa: BLE001 - the old version's log is gone: rebuild
            raise _StaleError(f"version {seen} can no longer be read: {error}") from None
        added = _relative(table, set(table.file_uris()) - set(before.file_uris()))
        rows = self._insert(_rows_of_files(table, added), table.version(), _table_id(table))
        return f"caught up from version {seen} to {current}: {len(added)} files, {rows} rows"

    def _rebuild(self, table: DeltaTable, studies: Callable[[], Iterable[StudyRow]]) -> str:
        self._db.executescript(_SCHEMA)
        known = {row.study_instance_uid: row for row in studies()}
        accessed = {uid: row.last_access_time for uid, row in known.items()}
        rows = self._insert(
            _rows_of_files(table, None), table.version(), _table_id(table), accessed
        )
        with self._db:  # rows equal to the table's need not be written again
            for uid, gen in self._db.execute("SELECT study_instance_uid, dirty FROM studies"):
                if self.study(uid) == known.get(uid):
                    self._db.execute(_CLEAN, (uid, gen))
        return f"rebuilt from version {table.version()}: {rows} rows"

    def _insert(
        self,
        rows: Iterable[Sequence[Any]],
        version: int,
        table_id: str,
        accessed: Mapping[str, datetime | None] | None = None,
    ) -> int:
        count = 0
        touched: set[str] = set()
        with self._db:  # one transaction: the rows, their studies, the version they make
            for batch in _batched(rows, _BATCH):
                self._db.executemany(_INSERT, batch)
                touched.update(row[_STUDY] for row in batch)
                count += len(batch)
            self._refresh_studies(touched, accessed or {})
            self._set_meta(version, table_id)
        return count

    def _refresh_studies(
        self, study_uids: Iterable[str], accessed: Mapping[str, datetime | None]
    ) -> None:
        for uid in study_uids:
            records = [
                _record(row)
                for row in self._db.execute(_SELECT + " WHERE study_instance_uid = ?", (uid,))
            ]
            current = self.study(uid)
            last_access = current.last_access_time if current else accessed.get(uid)
            self._db.execute(_UPSERT_STUDY, _study_values(derive_study(records, last_access)))

    # -- reading ----------------------------------------------------------------------

    def by_sha256(self, sha256: str) -> InstanceRecord | None:
        row = self._db.execute(_SELECT + " WHERE sha256 = ?", (sha256,)).fetchone()
        return _record(row) if row is not None else None

    def by_sha256s(self, sha256s: Sequence[str]) -> dict[str, InstanceRecord]:
        found: dict[str, InstanceRecord] = {}
        for chunk, marks in _in_lists(sha256s):
            for row in self._db.execute(_SELECT + f" WHERE sha256 IN ({marks})", chunk):
                record = _record(row)
                found[record.sha256] = record
        return found

    def by_sop(self, sop_instance_uid: str, version: int | None = None) -> InstanceRecord | None:
        """The newest version of a SOP Instance (or the given ``version``)."""
        if version is None:
            sql = _SELECT + " WHERE sop_instance_uid = ? ORDER BY version DESC LIMIT 1"
            row = self._db.execute(sql, (sop_instance_uid,)).fetchone()
        else:
            sql = _SELECT + " WHERE sop_instance_uid = ? AND version = ?"
            row = self._db.execute(sql, (sop_instance_uid, version)).fetchone()
        return _record(row) if row is not None else None

    def max_versions(self, sop_instance_uids: Iterable[str]) -> dict[str, int]:
        """The highest version of each of these SOP Instance UIDs that has one."""
        found: dict[str, int] = {}
        for chunk, marks in _in_lists(list(set(sop_instance_uids))):
            sql = (
                "SELECT sop_instance_uid, max(version) FROM instances "
                f"WHERE sop_instance_uid IN ({marks}) GROUP BY sop_instance_uid"
            )
            found.update((uid, int(version)) for uid, version in self._db.execute(sql, chunk))
        return found

    def study(self, study_instance_uid: str) -> StudyRow | None:
        row = self._db.execute(
            _SELECT_STUDY + " WHERE study_instance_uid = ?", (study_instance_uid,)
        ).fetchone()
        return _study(row) if row is not None else None

    def dirty_studies(self, limit: int) -> list[tuple[StudyRow, int]]:
        """Up to ``limit`` study rows changed since last written to Delta, each with its
        change counter (give both to ``mark_written``)."""
        sql = f"SELECT {', '.join(_STUDY_COLUMNS)}, dirty FROM studies WHERE dirty > 0 LIMIT ?"
        return [(_study(row[:-1]), int(row[-1])) for row in self._db.execute(sql, (limit,))]

    def mark_written(self, written: Iterable[tuple[str, int]]) -> None:
        """These study rows are in the Delta table as of these change counters."""
        with self._db:
            self._db.executemany(_CLEAN, list(written))

    def record_access(self, study_uids: Sequence[str], when: datetime) -> None:
        """Set these studies' last access (unknown UIDs are ignored)."""
        with self._db:
            self._db.executemany(
                "UPDATE studies SET last_access_time = ?, dirty = dirty + 1 "
                "WHERE study_instance_uid = ?",
                [(utc(when).isoformat(), uid) for uid in study_uids],
            )

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM instances").fetchone()[0])

    def version(self) -> int:
        """The version of ``instances`` the index reflects."""
        return int(self._meta()["version"])

    # -- writing ----------------------------------------------------------------------

    def add(self, records: Sequence[InstanceRecord], version: int, table_id: str) -> None:
        """Record rows just committed to ``instances`` as ``version``."""
        self._insert((_values(record) for record in records), version, table_id)

    def _meta(self) -> dict[str, str]:
        try:
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:  # no such table: a new file
            return {}

    def _set_meta(self, version: int, table_id: str) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("format", str(FORMAT)), ("version", str(version)), ("table_id", table_id)],
        )


class _StaleError(Exception):
    """The index cannot be brought up to date; it is rebuilt."""


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread=False: opened in a loading thread, then used by the actor's event
    # loop only (never two threads at once).
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a power cut may lose the last transactions, never corrupt the file; what
    # is lost is caught up from the table, whose version is recorded with the rows.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return connection


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS instances ("
    + ", ".join(f"{name} {_sql_type(name)}" for name in _COLUMNS)
    + ");\n"
    "CREATE UNIQUE INDEX IF NOT EXISTS instances_sha256 ON instances (sha256);\n"
    "CREATE INDEX IF NOT EXISTS instances_sop ON instances (sop_instance_uid, version);\n"
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);\n"
)
_STUDY = _COLUMNS.index("study_instance_uid")
_STUDY_COLUMNS = tuple(StudyRow.__dataclass_fields__)
_SCHEMA += (
    "CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);\n"
    "CREATE TABLE IF NOT EXISTS studies ("
    + ", ".join(
        f"{name} {'INTEGER' if name.endswith(('_count', 'bytes_in', 'bytes_stored')) else 'TEXT'}"
        for name in _STUDY_COLUMNS
    )
    + ", dirty INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (study_instance_uid));\n"
    "CREATE INDEX IF NOT EXISTS studies_dirty ON studies (dirty) WHERE dirty > 0;\n"
)
_UPSERT_STUDY = (
    f"INSERT INTO studies ({', '.join(_STUDY_COLUMNS)}, dirty) "
    f"VALUES ({', '.join('?' * len(_STUDY_COLUMNS))}, 1) "
    "ON CONFLICT (study_instance_uid) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _STUDY_COLUMNS[1:])
    + ", dirty = studies.dirty + 1"
)
_CLEAN = "UPDATE studies SET dirty = 0 WHERE study_instance_uid = ? AND dirty = ?"
_SELECT_STUDY = f"SELECT {', '.join(_STUDY_COLUMNS)} FROM studies"
_INSERT = (
    f"INSERT OR IGNORE INTO instances ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM instances"


def _values(record: InstanceRecord) -> tuple[Any, ...]:
    row = {name: getattr(record, name) for name in RECORD_FIELDS}
    row["ingest_date"] = utc(record.ingest_time).date()
    return tuple(_to_sql(row[name]) for name in _COLUMNS)


def _to_sql(value: Any) -> Any:
    if isinstance(value, date):  # datetime too
        return value.isoformat()
    return value


# DICOM's own value separator: no modality code contains it.
_SEPARATOR = "\\"


def _study_values(study: StudyRow) -> tuple[Any, ...]:
    values = []
    for name in _STUDY_COLUMNS:
        value = getattr(study, name)
        if name == "modalities":
            value = _SEPARATOR.join(value)
        values.append(_to_sql(value))
    return tuple(values)


def _study(row: Sequence[Any]) -> StudyRow:
    values: dict[str, Any] = dict(zip(_STUDY_COLUMNS, row, strict=True))
    values["modalities"] = [m for m in values["modalities"].split(_SEPARATOR) if m]
    day = values["study_date"]
    values["study_date"] = date.fromisoformat(day) if day else None
    for name in ("first_ingest_time", "last_ingest_time", "last_access_time"):
        if values[name] is not None:
            values[name] = datetime.fromisoformat(values[name])
    return study_from_row(values)


def _table_id(table: DeltaTable) -> str:
    return str(table.metadata().id)


def _record(row: Sequence[Any]) -> InstanceRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["study_date"] = (
        date.fromisoformat(values["study_date"]) if values["study_date"] else None
    )
    values["ingest_time"] = datetime.fromisoformat(values["ingest_time"])
    return record_from_row(values)


def _rows_of_files(table: DeltaTable, paths: set[str] | None) -> Iterator[tuple[Any, ...]]:
    """Rows of ``table`` (only those in the files ``paths``, relative to the table, when
    given), as index rows."""
    dataset = table.to_pyarrow_dataset()
    if paths is not None:
        if not paths:
            return
        fragments = [f for f in dataset.get_fragments() if f.path in paths]
        dataset = pa_dataset.FileSystemDataset(
            fragments, dataset.schema, dataset.format, dataset.filesystem
        )
    for batch in dataset.to_batches(columns=list(_COLUMNS), batch_size=_BATCH):
        for row in batch.to_pylist():
            yield tuple(_to_sql(row[name]) for name in _COLUMNS)


def _relative(table: DeltaTable, uris: set[str]) -> set[str]:
    """File URIs as paths relative to the table's root (as its PyArrow fragments name them)."""
    root = table.table_uri.rstrip("/") + "/"
    return {uri.removeprefix(root) for uri in uris}


def _in_lists(values: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """``values`` in runs short enough for one SQL ``IN (?, …)``, each with its marks."""
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        yield chunk, ", ".join("?" * len(chunk))


def _batched(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
