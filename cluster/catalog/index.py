"""The catalog's keyed lookups: by SHA-256 (the duplicate check), by SOP Instance UID
(retrieval), each study's current row, and the searches the doors make, from a SQLite
file on the catalog writer's disk.

It holds, per instance, its row of ``instances`` with its current placement applied (the
latest row of ``placements`` for its SHA-256, if any), and per study its row derived from
its instances plus its last access (the latest row of ``access``). A study's row is
derived again whenever rows of it are added or moved, in the same transaction, and is
marked dirty (a counter, so that a change made while an older one is being written is not
lost) until the writer has folded it into the Delta ``studies`` table; a crash between
the two loses nothing, the dirty mark survives it. Reads change only ``last_access_time``,
which the Delta ``studies`` table does not hold, so they never make a row dirty.

The Delta tables stay the truth; this index is derived from them and can always be
rebuilt. For each of ``instances``, ``placements`` and ``access`` it records the version
it has seen, in the same transaction as the rows: when the writer starts, it reads only
the files added to each table since then (the rows of a commit whose index update was cut
off by a crash, or of another writer), and when the file is lost, damaged, of another
format, or built from other tables, it is rebuilt from the whole tables.

Why SQLite: B-tree lookups by key in microseconds on the request path, durable, in the
standard library, and its memory is its page cache (``CACHE_KIB``), not the archive: the
writer no longer holds a dictionary of every instance (measured ~470 bytes each). On disk
it costs a little more than a row of ``instances`` per instance (see docs/catalog.md).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable

from cluster.catalog.placements import Placement, placements_table
from cluster.catalog.schema import (
    ACCESS,
    INSTANCES,
    PLACEMENTS,
    RECORD_FIELDS,
    StudyRow,
    instances_table,
    record_from_row,
    s3_filesystem,
    study_date_partition,
    study_from_row,
    table_dataset,
    table_root,
    utc,
)
from workers.records import InstanceRecord

log = logging.getLogger("strata.catalog")

# The index's own schema; a file with another one is rebuilt.
FORMAT = 6
CACHE_KIB = 64 * 1024  # SQLite's page cache: the index's whole memory
_BATCH = 50_000

_COLUMNS = (*RECORD_FIELDS, "ingest_date")
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
    "byte_offset",
    "byte_length",
}
# Between a study's modalities in the index: DICOM's own value separator, which no
# modality code contains.
MODALITY_SEPARATOR = "\\"
_PLACEMENT_COLUMNS = tuple(Placement.__dataclass_fields__)
# What a placement overrides in an instance's record.
_PLACED = ("tier", "object_key", "key_id")
_STUDY_COLUMNS = tuple(StudyRow.__dataclass_fields__)


def _sql_type(name: str) -> str:
    if name in _INTEGERS or name.endswith(("_count", "_time")):  # times: microseconds
        return "INTEGER"
    return "TEXT"


def _create(name: str, columns: Sequence[str], extra: str = "") -> str:
    body = ", ".join(f"{column} {_sql_type(column)}" for column in columns)
    return f"CREATE TABLE IF NOT EXISTS {name} ({body}{extra});\n"


_TABLES = (
    _create("instances", _COLUMNS)
    + _create("placements", _PLACEMENT_COLUMNS, ", PRIMARY KEY (sha256)")
    + _create(
        "studies",
        _STUDY_COLUMNS,
        ", dirty INTEGER NOT NULL DEFAULT 1, delta_date TEXT, fold INTEGER, fold_date TEXT"
        ", PRIMARY KEY (study_instance_uid)",
    )
    + "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);\n"
    + "CREATE TABLE IF NOT EXISTS files (source TEXT, path TEXT, PRIMARY KEY (source, path));\n"
)
# Created after a rebuild's bulk insert (faster than keeping them up to date row by row).
_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS instances_sha256 ON instances (sha256);\n"
    "CREATE INDEX IF NOT EXISTS instances_sop ON instances (sop_instance_uid, version);\n"
    "CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid, ingest_time);\n"
    "CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid);\n"
    "CREATE INDEX IF NOT EXISTS studies_dirty ON studies (dirty) WHERE dirty > 0;\n"
    "CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_pseudonym);\n"
    "CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession_pseudonym);\n"
    "CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date);\n"
)

_INSERT = (
    f"INSERT OR IGNORE INTO instances ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_COLUMNS))})"
)
# An instance's record with its current placement applied.
_SELECT = "SELECT " + ", ".join(
    f"coalesce(p.{name}, i.{name})" if name in _PLACED else f"i.{name}" for name in _COLUMNS
)
_SELECT += " FROM instances i LEFT JOIN placements p ON p.sha256 = i.sha256"
_PLACE = (
    f"INSERT INTO placements ({', '.join(_PLACEMENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_PLACEMENT_COLUMNS))}) "
    "ON CONFLICT (sha256) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _PLACEMENT_COLUMNS[1:])
    + " WHERE excluded.placed_time >= placements.placed_time"
)
# A study's row from its instances (current placements applied), in SQL for speed: the
# definition is ``schema.derive_study``, and a test holds the two to the same rows.
# Pseudonyms come from the first stored instance, the tier from the latest; modalities
# are sorted when read (``_study``).
_DERIVE = (
    f"INSERT INTO studies ({', '.join(_STUDY_COLUMNS)}, dirty) "
    "SELECT s.study_instance_uid, "
    "(SELECT patient_pseudonym FROM instances f WHERE f.study_instance_uid = s.study_instance_uid"
    " ORDER BY f.ingest_time, f.sha256 LIMIT 1), "
    "(SELECT accession_pseudonym FROM instances f WHERE f.study_instance_uid = s.study_instance_uid"
    " ORDER BY f.ingest_time, f.sha256 LIMIT 1), "
    "s.study_date, "
    f"(SELECT group_concat(modality, '{MODALITY_SEPARATOR}') FROM"
    " (SELECT DISTINCT modality FROM instances m"
    " WHERE m.study_instance_uid = s.study_instance_uid AND m.modality != '')), "
    "s.instance_count, s.series_count, s.bytes_in, s.bytes_stored, "
    "(SELECT coalesce(p.tier, l.tier) FROM instances l"
    " LEFT JOIN placements p ON p.sha256 = l.sha256"
    " WHERE l.study_instance_uid = s.study_instance_uid ORDER BY l.ingest_time DESC, l.sha256 DESC"
    " LIMIT 1), "
    "s.first_ingest_time, s.last_ingest_time, NULL, 1 "
    "FROM (SELECT study_instance_uid, min(study_date) AS study_date, "
    "sum(version = 1) AS instance_count, count(DISTINCT series_instance_uid) AS series_count, "
    "sum(bytes_in) AS bytes_in, sum(bytes_stored) AS bytes_stored, "
    "min(ingest_time) AS first_ingest_time, max(ingest_time) AS last_ingest_time "
    "FROM instances WHERE {where} GROUP BY study_instance_uid) s WHERE 1 "
    "ON CONFLICT (study_instance_uid) DO UPDATE SET "
    + ", ".join(
        f"{name} = excluded.{name}" for name in _STUDY_COLUMNS[1:] if name != "last_access_time"
    )
    + ", dirty = studies.dirty + 1"
)
# The last access is the latest one seen, whatever order the rows arrive in.
_ACCESSED = (
    "UPDATE studies SET last_access_time = ? WHERE study_instance_uid = ? "
    "AND (last_access_time IS NULL OR last_access_time < ?)"
)
# A row folded into Delta: where it now is there (whatever changed since), and clean if
# nothing did.
_WRITTEN = "UPDATE studies SET delta_date = ? WHERE study_instance_uid = ?"
_CLEAN = "UPDATE studies SET dirty = 0 WHERE study_instance_uid = ? AND dirty = ?"
_NOT_PENDING = "UPDATE studies SET fold = NULL WHERE study_instance_uid = ?"
_SELECT_STUDY = f"SELECT {', '.join(_STUDY_COLUMNS)} FROM studies"


class CatalogIndex:
    """Instances by SHA-256 and by SOP Instance UID, studies, and the Delta versions they
    reflect."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        tables: Mapping[str, DeltaTable],
        options: dict[str, str],
        studies: Callable[[], Iterable[StudyRow]] = tuple,
    ) -> CatalogIndex:
        """The index at ``path``, brought up to date with ``tables`` (``instances``,
        ``placements``, ``access``), or rebuilt from them if it cannot be.

        ``studies`` reads the Delta ``studies`` table, for a rebuild: only rows that
        differ from it are marked dirty."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        started = time.monotonic()
        try:
            index = cls(_connect(path))
            how = index.catch_up(tables, options, studies)
        except (sqlite3.DatabaseError, _StaleError) as error:
            log.warning("catalog index %s is rebuilt from the tables: %s", path.name, error)
            for suffix in ("", "-wal", "-shm"):
                path.with_name(path.name + suffix).unlink(missing_ok=True)
            index = cls(_connect(path))
            how = index._rebuild(tables, options, studies)
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
        tables: Mapping[str, DeltaTable],
        options: dict[str, str],
        studies: Callable[[], Iterable[StudyRow]] = tuple,
    ) -> str:
        """Read the rows of files added to each table since the version the index reflects
        (rebuilding it when it has none); says what it did. Raises _StaleError when the
        index cannot be caught up (see ``open``)."""
        meta = self._meta()
        if not meta:
            return self._rebuild(tables, options, studies)
        if meta.get("format") != str(FORMAT):
            raise _StaleError(f"it has format {meta.get('format')}, not {FORMAT}")
        done = []
        for name in _SOURCES:
            table = tables[name]
            if meta.get(f"{name}.table_id") != _table_id(table):
                raise _StaleError(f"it was built from another {name} table")
            seen, current = int(meta[f"{name}.version"]), table.version()
            if seen == current:
                continue
            if seen > current:
                raise _StaleError(f"it has seen {name} version {seen}, the table is at {current}")
            known = self.files(name)
            unseen = unseen_files(table, options, seen, known)
            rows = self._apply(name, _batches(table, options, unseen, _SOURCES[name]), table)
            done.append(f"{name} {seen}→{current}: {len(unseen)} files, {rows} rows")
        return "caught up (" + "; ".join(done) + ")" if done else "up to date"

    def _rebuild(
        self,
        tables: Mapping[str, DeltaTable],
        options: Mapping[str, str],
        studies: Callable[[], Iterable[StudyRow]],
    ) -> str:
        # From nothing: a rebuild cut off by a crash left no meta, so it starts over; for
        # the same reason it need not wait for the disk until it is done.
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(
            "".join(f"DROP TABLE IF EXISTS {name};\n" for name in _OWN_TABLES) + _TABLES
        )
        with self._db:  # bulk insert first, then the B-trees in one pass each
            rows = 0
            for batch in _batches(tables[INSTANCES], options, None, _COLUMNS):
                self._db.executemany(_INSERT, _instance_rows(batch))
                rows += batch.num_rows
        self._db.executescript(_INDEXES)
        with self._db:
            for batch in _batches(tables[PLACEMENTS], options, None, _PLACEMENT_COLUMNS):
                self._db.executemany(_PLACE, _placement_rows(batch))
            self._derive_all_studies()
            for batch in _batches(tables[ACCESS], options, None, _ACCESS_COLUMNS):
                self._db.executemany(_ACCESSED, _access_rows(batch))
            known = {row.study_instance_uid: row for row in studies()}
            # Rows Delta has are rewritten when they differ (never appended twice), and
            # not at all when they are equal.
            self._db.executemany(
                _WRITTEN,
                [(study_date_partition(row).isoformat(), uid) for uid, row in known.items()],
            )
            self._db.executemany(
                _CLEAN,
                [
                    (uid, self._dirty(uid))
                    for uid, written in known.items()
                    if _same_in_delta(self.study(uid), written)
                ],
            )
            for name in _SOURCES:
                self._set_meta(name, tables[name])
                self._set_files(name, tables[name])
        self._db.execute("PRAGMA synchronous=NORMAL")
        return f"rebuilt from instances version {tables[INSTANCES].version()}: {rows} rows"

    def _derive_all_studies(self) -> None:
        """Every study's row, from one pass over the instances in study order."""
        self._db.execute(_DERIVE.format(where="1"))

    def _apply(self, name: str, batches: Iterable[pa.RecordBatch], table: DeltaTable) -> int:
        """Rows of table ``name``, and the version they bring the index to, in one
        transaction; study rows they change are derived again."""
        count = 0
        touched: set[str] = set()
        with self._db:
            for batch in batches:
                count += batch.num_rows
                if name == INSTANCES:
                    self._db.executemany(_INSERT, _instance_rows(batch))
                elif name == PLACEMENTS:
                    self._db.executemany(_PLACE, _placement_rows(batch))
                else:
                    self._db.executemany(_ACCESSED, _access_rows(batch))
                if name != ACCESS:
                    touched.update(batch.column("study_instance_uid").to_pylist())
            self._refresh_studies(touched)
            self._set_meta(name, table)
            self._set_files(name, table)
        return count

    def _refresh_studies(self, study_uids: Iterable[str]) -> None:
        """Derive these studies' rows again (their last access is kept)."""
        for chunk, marks in _in_lists(list(study_uids)):
            self._db.execute(_DERIVE.format(where=f"study_instance_uid IN ({marks})"), chunk)

    # -- reading ----------------------------------------------------------------------

    def by_sha256(self, sha256: str) -> InstanceRecord | None:
        row = self._db.execute(_SELECT + " WHERE i.sha256 = ?", (sha256,)).fetchone()
        return _record(row) if row is not None else None

    def by_sha256s(self, sha256s: Sequence[str]) -> dict[str, InstanceRecord]:
        found: dict[str, InstanceRecord] = {}
        for chunk, marks in _in_lists(sha256s):
            for row in self._db.execute(_SELECT + f" WHERE i.sha256 IN ({marks})", chunk):
                record = _record(row)
                found[record.sha256] = record
        return found

    def by_sop(self, sop_instance_uid: str, version: int | None = None) -> InstanceRecord | None:
        """The newest version of a SOP Instance (or the given ``version``)."""
        if version is None:
            sql = _SELECT + " WHERE i.sop_instance_uid = ? ORDER BY i.version DESC LIMIT 1"
            row = self._db.execute(sql, (sop_instance_uid,)).fetchone()
        else:
            sql = _SELECT + " WHERE i.sop_instance_uid = ? AND i.version = ?"
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

    def find_studies(
        self, conditions: Sequence[tuple[str, object]], limit: int, offset: int = 0
    ) -> list[StudyRow]:
        """Study rows matching every ``(column op ?, value)`` (see ``queries``)."""
        where, values = _where(conditions)
        sql = f"{_SELECT_STUDY} WHERE {where} ORDER BY study_instance_uid LIMIT ? OFFSET ?"
        return [_study(row) for row in self._db.execute(sql, (*values, limit, offset))]

    def find_instances(
        self, conditions: Sequence[tuple[str, object]], limit: int, offset: int = 0
    ) -> list[InstanceRecord]:
        """Instance records (current placement applied) matching every condition."""
        where, values = _where(conditions, prefix="i.")
        sql = (
            f"{_SELECT} WHERE {where} ORDER BY i.study_instance_uid, i.series_instance_uid, "
            "i.sop_instance_uid, i.version LIMIT ? OFFSET ?"
        )
        return [_record(row) for row in self._db.execute(sql, (*values, limit, offset))]

    def dirty_studies(self, limit: int) -> list[tuple[StudyRow, int, date | None]]:
        """Up to ``limit`` study rows changed since last folded into Delta, each with its
        change counter (for ``mark_written``) and the partition Delta holds it in (None
        if Delta has no row of it yet)."""
        sql = (
            f"SELECT {', '.join(_STUDY_COLUMNS)}, dirty, delta_date FROM studies "
            "WHERE dirty > 0 LIMIT ?"
        )
        return [
            (_study(row[:-2]), int(row[-2]), date.fromisoformat(row[-1]) if row[-1] else None)
            for row in self._db.execute(sql, (limit,))
        ]

    def _dirty(self, study_instance_uid: str) -> int:
        sql = "SELECT dirty FROM studies WHERE study_instance_uid = ?"
        row = self._db.execute(sql, (study_instance_uid,)).fetchone()
        return int(row[0]) if row else 0

    def dirty_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM studies WHERE dirty > 0").fetchone()[0])

    def mark_written(self, written: Iterable[tuple[StudyRow, int]]) -> None:
        """These study rows (each read with this change counter) are in the Delta table."""
        rows = list(written)
        with self._db:
            self._db.executemany(
                _WRITTEN,
                [(study_date_partition(r).isoformat(), r.study_instance_uid) for r, _ in rows],
            )
            self._db.executemany(_CLEAN, [(r.study_instance_uid, gen) for r, gen in rows])
            self._db.executemany(_NOT_PENDING, [(r.study_instance_uid,) for r, _ in rows])

    def begin_fold(self, new: Sequence[StudyRow], fold: int) -> None:
        """These rows, new to Delta, are about to be appended by fold number ``fold``.

        Written through to the disk (``synchronous=FULL``), unlike the index's other
        transactions: a power cut that lost this mark while the append survived would
        have the rows appended again."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._db:
                self._db.executemany(
                    "UPDATE studies SET fold = ?, fold_date = ? WHERE study_instance_uid = ?",
                    [
                        (fold, study_date_partition(row).isoformat(), row.study_instance_uid)
                        for row in new
                    ],
                )
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def settle_folds(self, committed: int) -> int:
        """After a crash between a fold's append and ``mark_written``: rows of folds up to
        number ``committed`` (the table's transaction version) are in Delta, in the
        partition they were appended to; the others are not. Returns how many were."""
        with self._db:
            pending = self._db.execute(
                "SELECT study_instance_uid, fold_date FROM studies "
                "WHERE fold IS NOT NULL AND fold <= ?",
                (committed,),
            ).fetchall()
            self._db.executemany(_WRITTEN, [(day, uid) for uid, day in pending])
            self._db.execute("UPDATE studies SET fold = NULL WHERE fold IS NOT NULL")
        return len(pending)

    def pending_folds(self) -> bool:
        return (
            self._db.execute("SELECT 1 FROM studies WHERE fold IS NOT NULL").fetchone() is not None
        )

    def count(self) -> int:
        """Instances in the index (rows are never deleted, so the last rowid is the count:
        no scan, which at 10⁷ rows would fill the page cache)."""
        return int(self._db.execute("SELECT coalesce(max(rowid), 0) FROM instances").fetchone()[0])

    def version(self, table: str = INSTANCES) -> int:
        """The version of ``table`` the index reflects."""
        return int(self._meta()[f"{table}.version"])

    # -- writing ----------------------------------------------------------------------

    def add(self, records: Sequence[InstanceRecord], table: DeltaTable) -> None:
        """Record rows just committed to ``instances`` (``table``, at that commit)."""
        self._apply(INSTANCES, [_record_batch(records)], table)

    def add_placements(self, placements: Sequence[Placement], table: DeltaTable) -> None:
        """Record placements just committed to ``placements`` (``table``, at that commit)."""
        self._apply(PLACEMENTS, placements_table(placements).to_batches(), table)

    def add_access(self, batch: pa.Table, table: DeltaTable) -> None:
        """Record accesses just committed to ``access`` (``table``, at that commit)."""
        self._apply(ACCESS, batch.to_batches(), table)

    def files(self, name: str) -> set[str]:
        """The files of table ``name`` whose rows are all in the index."""
        rows = self._db.execute("SELECT path FROM files WHERE source = ?", (name,))
        return {path for (path,) in rows}

    def _set_files(self, name: str, table: DeltaTable) -> None:
        """The files of ``table``'s version are now all in the index (a few hundred rows:
        compaction keeps a table's files few)."""
        self._db.execute("DELETE FROM files WHERE source = ?", (name,))
        self._db.executemany(
            "INSERT INTO files (source, path) VALUES (?, ?)",
            [(name, path) for path in _paths(table)],
        )

    def _meta(self) -> dict[str, str]:
        found = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        if self._db.execute(found).fetchone() is None:  # a new file
            return {}
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def _set_meta(self, name: str, table: DeltaTable) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [
                ("format", str(FORMAT)),
                (f"{name}.version", str(table.version())),
                (f"{name}.table_id", _table_id(table)),
            ],
        )


class _StaleError(Exception):
    """The index cannot be brought up to date; it is rebuilt."""


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread=False: opened in a loading thread, then used by the actor's event
    # loop only (never two threads at once).
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a power cut may lose the last transactions, never corrupt the file; what
    # is lost is caught up from the tables, whose versions are recorded with the rows.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return connection


_OWN_TABLES = ("instances", "placements", "studies", "meta", "files")
_ACCESS_COLUMNS = ("study_instance_uid", "access_time")
# The columns the index reads from each source table.
_SOURCES: dict[str, Sequence[str]] = {
    INSTANCES: _COLUMNS,
    PLACEMENTS: _PLACEMENT_COLUMNS,
    ACCESS: _ACCESS_COLUMNS,
}


# Timestamps are integer microseconds since the epoch (UTC) in the index, dates ISO text:
# both compare and sort as they should, and Arrow converts whole columns to them at once.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _to_sql(value: Any) -> Any:
    if isinstance(value, datetime):
        return (utc(value) - _EPOCH) // timedelta(microseconds=1)
    if isinstance(value, date):
        return value.isoformat()
    return value


def _from_micros(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def _sql_rows(batch: pa.RecordBatch, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``batch`` as index values, converted by column in Arrow."""
    lists = []
    for name in columns:
        column = batch.column(name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        elif pa.types.is_date(column.type):
            column = column.cast(pa.string())
        lists.append(column.to_pylist())
    return zip(*lists, strict=True)


def _instance_rows(batch: pa.RecordBatch) -> Iterator[tuple[Any, ...]]:
    return _sql_rows(batch, _COLUMNS)


def _placement_rows(batch: pa.RecordBatch) -> Iterator[tuple[Any, ...]]:
    return _sql_rows(batch, _PLACEMENT_COLUMNS)


def _access_rows(batch: pa.RecordBatch) -> Iterator[tuple[Any, ...]]:
    for uid, moment in _sql_rows(batch, _ACCESS_COLUMNS):
        yield moment, uid, moment


def _record_batch(records: Sequence[InstanceRecord]) -> pa.RecordBatch:
    return instances_table(records).combine_chunks().to_batches()[0]


def _study(row: Sequence[Any]) -> StudyRow:
    values: dict[str, Any] = dict(zip(_STUDY_COLUMNS, row, strict=True))
    values["modalities"] = sorted(
        m for m in (values["modalities"] or "").split(MODALITY_SEPARATOR) if m
    )
    day = values["study_date"]
    values["study_date"] = date.fromisoformat(day) if day else None
    for name in ("first_ingest_time", "last_ingest_time", "last_access_time"):
        values[name] = _from_micros(values[name])
    return study_from_row(values)


def _same_in_delta(row: StudyRow | None, written: StudyRow | None) -> bool:
    """Whether the Delta row ``written`` already says what ``row`` says (Delta holds no
    last access)."""
    if row is None or written is None:
        return False
    return row.__dict__ | {"last_access_time": None} == written.__dict__ | {
        "last_access_time": None
    }


def _where(conditions: Sequence[tuple[str, object]], prefix: str = "") -> tuple[str, list[Any]]:
    clauses = [prefix + sql for sql, value in conditions if value is not None]
    values = [_to_sql(value) for _, value in conditions if value is not None]
    return (" AND ".join(clauses) if clauses else "1"), values


def _table_id(table: DeltaTable) -> str:
    return str(table.metadata().id)


def _record(row: Sequence[Any]) -> InstanceRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["study_date"] = (
        date.fromisoformat(values["study_date"]) if values["study_date"] else None
    )
    values["ingest_time"] = _from_micros(values["ingest_time"])
    return record_from_row(values)


def _batches(
    table: DeltaTable,
    options: Mapping[str, str],
    paths: set[str] | None,
    columns: Sequence[str],
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``table`` (only those in the files ``paths``, relative to the
    table, when given)."""
    if paths is not None and not paths:
        return
    dataset = table_dataset(table, options, paths)
    # One batch decoded at a time: the readahead's defaults hold about a million rows.
    yield from dataset.to_batches(
        columns=list(columns), batch_size=_BATCH, batch_readahead=1, fragment_readahead=1
    )


def file_rows(table: DeltaTable, path: str) -> int | None:
    """The number of rows the log records for one file of ``table`` (None if unknown)."""
    actions = table.get_add_actions(flatten=True)
    for name, rows in zip(
        actions.column("path").to_pylist(), actions.column("num_records").to_pylist(), strict=True
    ):
        if urllib.parse.unquote(name) == path:
            return None if rows is None else int(rows)
    return None


def _paths(table: DeltaTable) -> set[str]:
    """The files of ``table``'s version, as its log names them (relative to the table)."""
    paths = table.get_add_actions(flatten=True).column("path").to_pylist()
    return {urllib.parse.unquote(path) for path in paths}


def unseen_files(
    table: DeltaTable, options: Mapping[str, str], since: int, known: set[str]
) -> set[str]:
    """The files of ``table`` that may hold rows the index has not seen: every file it does
    not know, except the output of a compaction of files it knew (``known``, as of table
    version ``since``).

    Without that exception, each compaction would have the index read back every row it
    rewrote (a whole day's partition) and fold all their studies again. A compaction is a
    commit whose adds all say ``dataChange: false``; its rows are already known when every
    file it removed was. delta-rs's Python API gives no per-commit actions, so the commit
    files of ``_delta_log`` after ``since`` are read here (JSON lines, one action each);
    from a commit whose file is gone (cleaned up after a checkpoint) on, the files cannot
    be explained and are read.
    """
    unknown = _paths(table) - known
    filesystem = s3_filesystem(options)
    log = f"{table_root(table)}/_delta_log"
    seen = set(known)
    rewritten: set[str] = set()
    for version in range(since + 1, table.version() + 1):
        try:
            with filesystem.open_input_stream(f"{log}/{version:020d}.json") as stream:
                actions = [json.loads(line) for line in stream.read().splitlines() if line]
        except (OSError, ValueError):
            break
        adds = [action["add"] for action in actions if "add" in action]
        removed = {urllib.parse.unquote(a["remove"]["path"]) for a in actions if "remove" in a}
        if adds and not any(add.get("dataChange", True) for add in adds) and removed <= seen:
            outputs = {urllib.parse.unquote(add["path"]) for add in adds}
            rewritten |= outputs
            seen |= outputs
    return unknown - rewritten


def _in_lists(values: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """``values`` in runs short enough for one SQL ``IN (?, …)``, each with its marks."""
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        yield chunk, ", ".join("?" * len(chunk))
