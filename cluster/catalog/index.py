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

It also keeps a copy of the journal groups not yet flushed into Delta (``journal``), which
the writer's flush reads; the journal objects in MinIO are the durable ones.

The Delta tables and the journal stay the truth; this index is derived from them and can
always be rebuilt. For each of ``instances``, ``placements`` and ``access`` it records the
version it has seen, in the same transaction as the rows: when the writer starts, it
reads only the files that the commits since then added (another writer's, or a flush whose
index update a crash cut off), and when the file is lost, damaged, of another format, or
built from other tables, it is rebuilt from the whole tables.

Why SQLite: B-tree lookups by key in microseconds on the request path, durable, in the
standard library, and its memory is its page cache (``CACHE_KIB``), not the archive.

Why rows look as they do (about 0.25 KB an instance; docs/catalog.md measures it): strings
repeated across instances (SOP Class, transfer syntaxes, notes, tier, key) are kept once in
``codes`` and as small integers in each row; lowercase hex (SHA-256, pseudonyms) as the bytes
it spells; UIDs four bits a character; the B-trees over UIDs hold a 47-bit hash of the UID
(``*_key``), not the UID, and each search compares the UID itself too; a pack key named
the way ingest names them (``store.pack_key_for``: the study's hash prefix and 16 random
bytes) only as those 16 bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from cluster.catalog import columns
from cluster.catalog.columns import pack_hex, pack_uid
from cluster.catalog.placements import DELETED, LATER_PLACEMENT_COLUMNS, PLACEMENTS_SCHEMA
from cluster.catalog.queries import InstanceFilters, StudyFilters
from cluster.catalog.schema import (
    ACCESS,
    ACCESS_SCHEMA,
    IDENTITY,
    IDENTITY_SCHEMA,
    INSTANCES,
    JOURNALED,
    LATER_INSTANCE_COLUMNS,
    PLACEMENTS,
    RECORD_FIELDS,
    StudyRow,
    s3_filesystem,
    study_date_partition,
    study_from_row,
    table_dataset,
    table_root,
)
from workers.objects.store import pack_id_in, pack_key_from, study_prefix
from workers.records import InstanceRecord

log = logging.getLogger("strata.catalog")

# The index's own schema; a file with another one is rebuilt.
FORMAT = 10
CACHE_KIB = 64 * 1024  # SQLite's page cache: the index's whole memory
_BATCH = 50_000
# Studies derived by one statement when the index is rebuilt.
_STUDIES_PER_DERIVE = 500
# Studies a rebuild remembers as already derived while it scans the instances in the order
# they were written (a study's instances arrive together, so a small window suffices).
_RECENT_STUDIES = 100_000

# Strings repeated across instances: kept once in ``codes``, as small integers in rows.
_CODED = (
    "sop_class_uid",
    "modality",
    "body_part",
    "transfer_syntax_in",
    "transfer_syntax_stored",
    "storage_action",
    "storage_note",
    "photometric_interpretation",
    "tier",
    "key_id",
    "source",
    "manufacturer",
    "model",
)
# Lowercase hex, kept as the bytes it spells.
_HEXED = ("sha256", "patient_pseudonym", "accession_pseudonym")
# UIDs the index finds rows by, and the column of each one's hash.
_KEYS = {
    "sop_instance_uid": "sop_key",
    "series_instance_uid": "series_key",
    "study_instance_uid": "study_key",
}
_PLAIN = (
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
)
# The columns of the index's ``instances``, in order (``id`` before them).
_INSTANCE_COLUMNS = (
    "sha256",
    "sop_key",
    "sop_instance_uid",
    "version",
    "series_key",
    "series_instance_uid",
    "study_key",
    "study_instance_uid",
    *_CODED,
    "study_date",  # days since 1970-01-01
    "patient_pseudonym",
    "accession_pseudonym",
    *(name for name in _PLAIN if name != "version"),
    "object_key",  # the 16 random bytes of a pack key of the row's study, else the key
    "ingest_time",  # microseconds since the epoch, UTC
)
# What a placement overrides in an instance's record.
_PLACED = ("tier", "object_key", "byte_offset", "byte_length", "key_id", "transfer_syntax_stored")
_PLACEMENT_COLUMNS = (
    "sha256",
    "tier",
    "bucket",
    "object_key",
    "byte_offset",
    "byte_length",
    "key_id",
    "placed_time",
    "transfer_syntax_stored",  # added later: NULL (the instance's own) in older rows
)
_STUDY_COLUMNS = tuple(StudyRow.__dataclass_fields__)
# Between a study's modalities in the index: DICOM's own value separator, which no
# modality code contains.
MODALITY_SEPARATOR = "\\"

# When the tiering policy must look at a study again (microseconds since the epoch, UTC;
# 0: now). Set to 0 whenever the study changes (ingest, move, read); the plan sets it to
# the moment its time conditions could next flip (``engine.next_change``).
_TIER_DUE = "tier_due INTEGER NOT NULL DEFAULT 0"
NEVER_DUE = 2**62
_DUE_INDEX = "CREATE INDEX IF NOT EXISTS studies_due ON studies (tier_due, study_instance_uid)"

_TABLES = (
    "CREATE TABLE IF NOT EXISTS instances (id INTEGER PRIMARY KEY, "
    + ", ".join(_INSTANCE_COLUMNS)
    + ");\n"
    "CREATE TABLE IF NOT EXISTS codes (id INTEGER PRIMARY KEY, value TEXT NOT NULL UNIQUE);\n"
    "CREATE TABLE IF NOT EXISTS placements ("
    + ", ".join(_PLACEMENT_COLUMNS)
    + ", PRIMARY KEY (sha256)) WITHOUT ROWID;\n"
    "CREATE TABLE IF NOT EXISTS studies ("
    + ", ".join(_STUDY_COLUMNS)
    + ", dirty INTEGER NOT NULL DEFAULT 1, delta_date TEXT, fold INTEGER, fold_date TEXT"
    f", {_TIER_DUE}, PRIMARY KEY (study_instance_uid));\n"
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);\n"
    "CREATE TABLE IF NOT EXISTS journal (source TEXT NOT NULL, seq INTEGER NOT NULL, "
    "rows INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (source, seq));\n"
    # The identity index: each file's sealed box, and each blind token's studies.
    "CREATE TABLE IF NOT EXISTS identity (sha256 BLOB PRIMARY KEY, sealed BLOB NOT NULL)"
    " WITHOUT ROWID;\n"
    "CREATE TABLE IF NOT EXISTS identity_tokens (token INTEGER NOT NULL, study BLOB NOT NULL,"
    " PRIMARY KEY (token, study)) WITHOUT ROWID;\n"
)
# Created after a rebuild's bulk insert (faster than keeping them up to date row by row).
_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS instances_sha256 ON instances (sha256);\n"
    "CREATE INDEX IF NOT EXISTS instances_sop ON instances (sop_key, version);\n"
    "CREATE INDEX IF NOT EXISTS instances_study ON instances (study_key);\n"
    "CREATE INDEX IF NOT EXISTS instances_series ON instances (series_key);\n"
    "CREATE INDEX IF NOT EXISTS studies_dirty ON studies (dirty) WHERE dirty > 0;\n"
    "CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_pseudonym);\n"
    "CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession_pseudonym);\n"
    "CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date);\n"
    f"{_DUE_INDEX};\n"
)

_INSERT = (
    f"INSERT OR IGNORE INTO instances ({', '.join(_INSTANCE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_INSTANCE_COLUMNS))})"
)
# An instance's record with its current placement applied, in RECORD_FIELDS' order.
# A placement's byte range is also the instance's stored size there (a tier with its own
# codec stores fewer bytes; a deleted instance none).
_SELECT = "SELECT " + ", ".join(
    f"coalesce(p.{name}, i.{name})"
    if name in _PLACED
    else "coalesce(p.byte_length, i.bytes_stored)"
    if name == "bytes_stored"
    else f"i.{name}"
    for name in RECORD_FIELDS
)
_SELECT += " FROM instances i LEFT JOIN placements p ON p.sha256 = i.sha256"
_PLACE = (
    f"INSERT INTO placements ({', '.join(_PLACEMENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_PLACEMENT_COLUMNS))}) "
    "ON CONFLICT (sha256) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in _PLACEMENT_COLUMNS[1:])
    + " WHERE excluded.placed_time >= placements.placed_time"
)
# The instances of one study (``f`` standing for the table), by its key and its UID.
_OF_STUDY = "{t}.study_key = s.study_key AND {t}.study_instance_uid = s.study_instance_uid"
# A study's row from its instances (current placements applied), in SQL for speed: the
# definition is ``schema.derive_study``, and a test holds the two to the same rows.
# Pseudonyms come from the first stored instance, the tier from the latest; modalities
# are sorted when read (``_study``). Ties in ingest time are broken by SHA-256 (its bytes
# sort as its hex does).
# An instance not deleted at its study's retention end (``t`` its alias, ``q`` its
# placement's), in SQL: counts, sizes, modalities and the tier are of these.
_LIVE = "coalesce({q}.tier, {t}.tier) IS NOT (SELECT id FROM codes WHERE value = '" + DELETED + "')"
_DERIVE = (
    f"INSERT INTO studies ({', '.join(_STUDY_COLUMNS)}, dirty) "
    "SELECT s.study_instance_uid, "
    f"(SELECT patient_pseudonym FROM instances f WHERE {_OF_STUDY.format(t='f')}"
    " ORDER BY f.ingest_time, f.sha256 LIMIT 1), "
    f"(SELECT accession_pseudonym FROM instances f WHERE {_OF_STUDY.format(t='f')}"
    " ORDER BY f.ingest_time, f.sha256 LIMIT 1), "
    "date(s.study_date * 86400, 'unixepoch'), "
    f"(SELECT group_concat(c.value, '{MODALITY_SEPARATOR}') FROM"
    " (SELECT DISTINCT m.modality AS code FROM instances m"
    " LEFT JOIN placements q ON q.sha256 = m.sha256"
    f" WHERE {_OF_STUDY.format(t='m')} AND {_LIVE.format(q='q', t='m')}) d"
    " JOIN codes c ON c.id = d.code WHERE c.value != ''), "
    "s.instance_count, s.series_count, s.bytes_in, s.bytes_stored, "
    # The latest live instance's tier; ``deleted`` when none is left.
    "(SELECT c.value FROM instances l LEFT JOIN placements p ON p.sha256 = l.sha256"
    " JOIN codes c ON c.id = coalesce(p.tier, l.tier)"
    f" WHERE {_OF_STUDY.format(t='l')} ORDER BY {_LIVE.format(q='p', t='l')} DESC,"
    " l.ingest_time DESC, l.sha256 DESC LIMIT 1), "
    "s.first_ingest_time, s.last_ingest_time, NULL, 1 "
    "FROM (SELECT study_key, study_instance_uid, min(study_date) AS study_date, "
    f"sum(version = 1 AND {_LIVE.format(q='p', t='i')}) AS instance_count, "
    f"count(DISTINCT CASE WHEN {_LIVE.format(q='p', t='i')} THEN series_instance_uid END)"
    " AS series_count, "
    f"sum(CASE WHEN {_LIVE.format(q='p', t='i')} THEN bytes_in ELSE 0 END) AS bytes_in, "
    "sum(coalesce(p.byte_length, i.bytes_stored)) AS bytes_stored, "
    "min(ingest_time) AS first_ingest_time, max(ingest_time) AS last_ingest_time "
    "FROM instances i LEFT JOIN placements p ON p.sha256 = i.sha256 "
    "WHERE study_key IN ({keys}) AND study_instance_uid IN ({uids}) "
    "GROUP BY study_key, study_instance_uid) s WHERE 1 "
    "ON CONFLICT (study_instance_uid) DO UPDATE SET "
    + ", ".join(
        f"{name} = excluded.{name}" for name in _STUDY_COLUMNS[1:] if name != "last_access_time"
    )
    # A change makes the study due now; one with nothing left (deleted) is never due.
    + f", dirty = studies.dirty + 1, tier_due = CASE WHEN excluded.tier = '{DELETED}'"
    + f" THEN {NEVER_DUE} ELSE 0 END"
)
# The last access is the latest one seen, whatever order the rows arrive in.
_ACCESSED = (
    "UPDATE studies SET last_access_time = ?, tier_due = 0 WHERE study_instance_uid = ? "
    "AND (last_access_time IS NULL OR last_access_time < ?)"
)
# A row folded into Delta: where it now is there (whatever changed since), and clean if
# nothing did.
_WRITTEN = "UPDATE studies SET delta_date = ? WHERE study_instance_uid = ?"
_CLEAN = "UPDATE studies SET dirty = 0 WHERE study_instance_uid = ? AND dirty = ?"
_NOT_PENDING = "UPDATE studies SET fold = NULL WHERE study_instance_uid = ?"
_SELECT_STUDY = f"SELECT {', '.join(_STUDY_COLUMNS)} FROM studies"
# The tables the index reads (``studies`` it derives itself).
SOURCES = (INSTANCES, PLACEMENTS, ACCESS, IDENTITY)
# The tables whose rows belong to studies, whose rows they change.
_OF_STUDIES = (INSTANCES, PLACEMENTS)
_IDENTIFY = "INSERT OR REPLACE INTO identity (sha256, sealed) VALUES (?, ?)"
_TOKEN = "INSERT OR IGNORE INTO identity_tokens (token, study) VALUES (?, ?)"


class CatalogIndex:
    """Instances by SHA-256 and by SOP Instance UID, studies, the journal not yet flushed,
    and the Delta versions they reflect."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._codes = _Codes(connection)

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
        differ from it are marked dirty. The journal is the writer's to replay
        (``apply``)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        started = time.monotonic()
        try:
            index = cls(_connect(path))
            how = index.catch_up(tables, options, studies)
        except (sqlite3.DatabaseError, StaleIndexError) as error:
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
        options: Mapping[str, str],
        studies: Callable[[], Iterable[StudyRow]] = tuple,
        own: Mapping[str, int] | None = None,
    ) -> str:
        """Read the rows of files that commits since the version the index reflects added
        (rebuilding it when it has none), except those of the versions in ``own`` (the
        writer's own flush, whose rows the index holds); says what it did. Raises
        StaleIndexError when the index cannot be caught up (see ``open``)."""
        meta = self._meta()
        if not meta:
            return self._rebuild(tables, options, studies)
        if meta.get("format") != str(FORMAT):
            raise StaleIndexError(f"it has format {meta.get('format')}, not {FORMAT}")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(studies)")}
        if "tier_due" not in columns:  # an index of an earlier version: every study due
            with self._db:
                self._db.execute(f"ALTER TABLE studies ADD COLUMN {_TIER_DUE}")
                self._db.execute(_DUE_INDEX)
        with self._db:  # columns added later: null (read as "" or the instance's) in older rows
            for own_table, later in (
                ("instances", LATER_INSTANCE_COLUMNS),
                ("placements", LATER_PLACEMENT_COLUMNS),
            ):
                info = self._db.execute(f"PRAGMA table_info({own_table})")
                columns = {row[1] for row in info}
                for column in later:
                    if column not in columns:
                        self._db.execute(f"ALTER TABLE {own_table} ADD COLUMN {column}")
        done = []
        for name in SOURCES:
            table = tables[name]
            if meta.get(f"{name}.table_id") != _table_id(table):
                raise StaleIndexError(f"it was built from another {name} table")
            seen, current = int(meta[f"{name}.version"]), table.version()
            if seen == current:
                continue
            if seen > current:
                raise StaleIndexError(
                    f"it has seen {name} version {seen}, the table is at {current}"
                )
            skip = {own[name]} if own and name in own else set()
            paths = data_files(table, options, seen, skip)
            rows = self._apply_files(name, table, options, paths)
            done.append(f"{name} {seen}→{current}: {len(paths)} files, {rows} rows")
        return "caught up (" + "; ".join(done) + ")" if done else "up to date"

    def _rebuild(
        self,
        tables: Mapping[str, DeltaTable],
        options: Mapping[str, str],
        studies: Callable[[], Iterable[StudyRow]],
    ) -> str:
        # From nothing: a rebuild cut off by a crash left no meta (or a damaged file), so
        # it starts over; for the same reason it need not wait for the disk, nor keep a
        # journal, until it is done (in WAL mode, building a B-tree over 10⁷ rows wrote a
        # write-ahead log larger than the table).
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(
            "".join(f"DROP TABLE IF EXISTS {name};\n" for name in _OWN_TABLES) + _TABLES
        )
        self._codes.forget()
        rows, started = 0, time.monotonic()
        # Bulk insert first, then the B-trees in one pass each.
        for batch in _batches(tables[INSTANCES], options, None, RECORD_FIELDS):
            encoded = self._instance_rows(batch)  # commits new codes by itself
            with self._db:
                self._db.executemany(_INSERT, encoded)
            rows += batch.num_rows
        log.info("catalog index rebuild: %d instance rows in %.0f s", rows, _since(started))
        self._db.executescript(_INDEXES)
        log.info("catalog index rebuild: B-trees built at %.0f s", _since(started))
        for batch in _batches(tables[PLACEMENTS], options, None, PLACEMENTS_SCHEMA.names):
            encoded = self._placement_rows(batch)
            with self._db:
                self._db.executemany(_PLACE, encoded)
        for batch in _batches(tables[IDENTITY], options, None, IDENTITY_SCHEMA.names):
            with self._db:
                self._write(IDENTITY, self._encode(IDENTITY, batch))
        self._derive_all_studies()
        log.info("catalog index rebuild: study rows derived at %.0f s", _since(started))
        with self._db:
            for batch in _batches(tables[ACCESS], options, None, ACCESS_SCHEMA.names):
                self._db.executemany(_ACCESSED, _access_rows(batch))
            known = {row.study_instance_uid: row for row in studies()}
            # Rows Delta has are rewritten when they differ (never appended twice), and
            # not at all when they are equal.
            self._db.executemany(
                _WRITTEN,
                [
                    (study_date_partition(row).isoformat(), pack_uid(uid))
                    for uid, row in known.items()
                ],
            )
            self._db.executemany(
                _CLEAN,
                [
                    (pack_uid(uid), self._dirty(uid))
                    for uid, written in known.items()
                    if _same_in_delta(self.study(uid), written)
                ],
            )
            for name in SOURCES:
                self._set_meta(name, tables[name])
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        return f"rebuilt from instances version {tables[INSTANCES].version()}: {rows} rows"

    def _derive_all_studies(self) -> None:
        """Every study's row, a few hundred studies per statement, in the order the
        instances were written (rowid order, read straight through the table).

        Not in the order of the study keys: the B-tree over them is a hash order, so each
        chunk's instances were random reads all over the table (about 50,000 studies a
        minute at 10⁸ instances once the table no longer fits the page cache). A study's
        instances arrive together, so a window of recently derived studies finds nearly
        every repeat; a study seen again after it left the window is derived twice, which
        gives the same row."""
        recent: OrderedDict[bytes | str, None] = OrderedDict()
        pending: list[str] = []
        scan = self._db.execute("SELECT study_instance_uid FROM instances NOT INDEXED")
        while chunk := scan.fetchmany(_BATCH):
            for (uid,) in chunk:
                if uid in recent:
                    continue
                recent[uid] = None
                if len(recent) > _RECENT_STUDIES:
                    recent.popitem(last=False)
                pending.append(_unuid(uid))
                if len(pending) == _STUDIES_PER_DERIVE:
                    with self._db:
                        self._derive(pending)
                    pending = []
        if pending:
            with self._db:
                self._derive(pending)

    def _apply_files(
        self, name: str, table: DeltaTable, options: Mapping[str, str], paths: set[str]
    ) -> int:
        """The rows of these files of table ``name`` (read again: idempotent), and the
        version they bring the index to, in one transaction."""
        count = 0
        encoded: list[Any] = []
        touched: set[str] = set()
        for batch in _batches(table, options, paths, JOURNALED[name].names):
            count += batch.num_rows
            encoded.append(self._encode(name, batch))
            if name in _OF_STUDIES:
                touched.update(batch.column("study_instance_uid").to_pylist())
        with self._db:
            for rows in encoded:
                self._write(name, rows)
            self._derive(touched)
            self._set_meta(name, table)
        return count

    # -- the journal ------------------------------------------------------------------

    def apply(self, name: str, seq: int, rows: pa.Table, data: bytes) -> None:
        """The rows of table ``name`` in journal group ``seq`` (``data``: their bytes in
        the journal), kept until flushed, and the study rows they change, in one
        transaction. Applying a group twice changes nothing."""
        self.apply_group(seq, {name: (rows, data)})

    def apply_group(self, seq: int, parts: Mapping[str, tuple[pa.Table, bytes]]) -> None:
        """``apply`` for every table's rows of journal group ``seq``, in one transaction."""
        # Encoded before the transaction: encoding may add codes, which is never done
        # inside one (see _Codes.ids).
        encoded = {
            name: [self._encode(name, batch) for batch in rows.to_batches()]
            for name, (rows, _) in parts.items()
        }
        with self._db:
            for name, (rows, data) in parts.items():
                touched = (
                    set(rows.column("study_instance_uid").to_pylist())
                    if name in _OF_STUDIES
                    else ()
                )
                for batch in encoded[name]:
                    self._write(name, batch)
                self._derive(touched)
                self._db.execute(
                    "INSERT OR REPLACE INTO journal (source, seq, rows, data) VALUES (?, ?, ?, ?)",
                    (name, seq, rows.num_rows, data),
                )
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('journal.seq', ?) "
                "ON CONFLICT (key) DO UPDATE SET "
                "value = max(CAST(value AS INTEGER), excluded.value)",
                (seq,),
            )

    def unflushed_groups(self) -> set[int]:
        """The numbers of the journal groups that hold rows of any table not flushed."""
        return {int(seq) for (seq,) in self._db.execute("SELECT DISTINCT seq FROM journal")}

    def last_seq(self) -> int:
        """The highest journal group number applied or reserved (0 for none)."""
        meta = self._meta()
        return max(int(meta.get("journal.seq", 0)), int(meta.get("journal.reserved", 0)))

    def reserve(self, upto: int) -> None:
        """Journal group numbers up to ``upto`` may be in use: a writer that starts over
        never gives them again (a PUT that seemed to fail can land later)."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('journal.reserved', ?)", (upto,)
            )

    def unflushed(self, name: str) -> list[tuple[int, int]]:
        """The journal groups of table ``name`` not flushed into Delta: (seq, rows), in
        order."""
        sql = "SELECT seq, rows FROM journal WHERE source = ? ORDER BY seq"
        return [(int(seq), int(rows)) for seq, rows in self._db.execute(sql, (name,))]

    def unflushed_rows(self) -> int:
        return int(self._db.execute("SELECT coalesce(sum(rows), 0) FROM journal").fetchone()[0])

    def journal_blobs(self, name: str, after: int, upto: int) -> list[tuple[int, bytes]]:
        """The journal objects' bytes of table ``name``'s groups ``after`` < seq ≤ ``upto``."""
        sql = "SELECT seq, data FROM journal WHERE source = ? AND seq > ? AND seq <= ? ORDER BY seq"
        return [(int(seq), bytes(data)) for seq, data in self._db.execute(sql, (name, after, upto))]

    def forget_flushed(self, name: str, upto: int) -> None:
        """Table ``name`` holds the journal groups up to ``upto``: drop their copies."""
        with self._db:
            self._db.execute("DELETE FROM journal WHERE source = ? AND seq <= ?", (name, upto))

    def flushed(self, name: str, upto: int, table: DeltaTable) -> None:
        """The writer's flush appended table ``name``'s journal groups up to ``upto``, and
        ``table``'s commits since the version the index reflects added nothing else (see
        ``data_files``): the index reflects ``table``'s version and drops those groups."""
        with self._db:
            self._db.execute("DELETE FROM journal WHERE source = ? AND seq <= ?", (name, upto))
            self._set_meta(name, table)

    def advance(self, name: str, table: DeltaTable) -> None:
        """``table``'s commits since the version the index reflects added no row (the
        writer's maintenance): the index reflects its version, so that a restart need not
        read them (their log entries expire with the retention window)."""
        with self._db:
            self._set_meta(name, table)

    # -- reading ----------------------------------------------------------------------

    def by_sha256(self, sha256: str) -> InstanceRecord | None:
        row = self._db.execute(_SELECT + " WHERE i.sha256 = ?", (pack_hex(sha256),)).fetchone()
        return self._record(row) if row is not None else None

    def by_sha256s(self, sha256s: Sequence[str]) -> dict[str, InstanceRecord]:
        found: dict[str, InstanceRecord] = {}
        for chunk, marks in _in_lists([pack_hex(sha) for sha in sha256s]):
            for row in self._db.execute(_SELECT + f" WHERE i.sha256 IN ({marks})", chunk):
                record = self._record(row)
                found[record.sha256] = record
        return found

    def by_sop(self, sop_instance_uid: str, version: int | None = None) -> InstanceRecord | None:
        """The newest version of a SOP Instance (or the given ``version``)."""
        where = " WHERE i.sop_key = ? AND i.sop_instance_uid = ?"
        values: tuple[Any, ...] = (uid_key(sop_instance_uid), pack_uid(sop_instance_uid))
        if version is None:
            sql = _SELECT + where + " ORDER BY i.version DESC LIMIT 1"
        else:
            sql, values = _SELECT + where + " AND i.version = ?", (*values, version)
        row = self._db.execute(sql, values).fetchone()
        return self._record(row) if row is not None else None

    def max_versions(self, sop_instance_uids: Iterable[str]) -> dict[str, int]:
        """The highest version of each of these SOP Instance UIDs that has one."""
        wanted = set(sop_instance_uids)
        found: dict[str, int] = {}
        for chunk, marks in _in_lists(sorted({uid_key(uid) for uid in wanted})):
            sql = (
                "SELECT sop_instance_uid, max(version) FROM instances "
                f"WHERE sop_key IN ({marks}) GROUP BY sop_instance_uid"
            )
            for packed, version in self._db.execute(sql, chunk):
                uid = _unuid(packed)
                if uid in wanted:  # not another UID with the same key
                    found[uid] = int(version)
        return found

    def identities(self, sha256s: Sequence[str]) -> dict[str, bytes]:
        """The sealed identity boxes of these files (those it has), by SHA-256."""
        found: dict[str, bytes] = {}
        for chunk, marks in _in_lists([pack_hex(sha) for sha in sha256s]):
            sql = f"SELECT sha256, sealed FROM identity WHERE sha256 IN ({marks})"
            for sha, sealed in self._db.execute(sql, chunk):
                found[_unpacked(sha)] = bytes(sealed)
        return found

    def study_boxes(self, study_uids: Sequence[str]) -> dict[str, tuple[str, bytes]]:
        """For each of these studies, its latest file's SOP Instance UID and sealed identity
        box (what a study-level search returns); studies without one are left out."""
        sql = (
            "SELECT i.sop_instance_uid, d.sealed FROM instances i JOIN identity d"
            " ON d.sha256 = i.sha256 WHERE i.study_key = ? AND i.study_instance_uid = ?"
            " ORDER BY i.id DESC LIMIT 1"
        )
        found: dict[str, tuple[str, bytes]] = {}
        for uid in study_uids:
            row = self._db.execute(sql, (uid_key(uid), pack_uid(uid))).fetchone()
            if row is not None:
                found[uid] = (_unuid(row[0]), bytes(row[1]))
        return found

    def study(self, study_instance_uid: str) -> StudyRow | None:
        row = self._db.execute(
            _SELECT_STUDY + " WHERE study_instance_uid = ?", (pack_uid(study_instance_uid),)
        ).fetchone()
        return _study(row) if row is not None else None

    def find_studies(self, filters: StudyFilters, limit: int, offset: int = 0) -> list[StudyRow]:
        """Study rows matching every filter, by Study Instance UID."""
        conditions: list[tuple[str, object]] = [
            ("study_instance_uid = ?", _uid_or_none(filters.study_uid)),
            ("patient_pseudonym = ?", _packed_or_none(filters.patient_pseudonym)),
            ("accession_pseudonym = ?", _packed_or_none(filters.accession_pseudonym)),
            (
                f"instr('{MODALITY_SEPARATOR}' || modalities || '{MODALITY_SEPARATOR}', ?) > 0",
                f"{MODALITY_SEPARATOR}{filters.modality}{MODALITY_SEPARATOR}"
                if filters.modality
                else None,
            ),
            ("tier = ?", filters.tier),
            # A study deleted at its retention end is found only when asked for by tier.
            ("coalesce(tier, '') != ?", None if filters.tier == DELETED else DELETED),
            ("study_date >= ?", filters.date_from.isoformat() if filters.date_from else None),
            ("study_date <= ?", filters.date_to.isoformat() if filters.date_to else None),
        ]
        conditions += [
            ("study_instance_uid IN (SELECT study FROM identity_tokens WHERE token = ?)", key)
            for key in map(token_key, filters.tokens)
        ]
        where, values = _where(conditions)
        sql = f"{_SELECT_STUDY} WHERE {where} ORDER BY study_instance_uid LIMIT ? OFFSET ?"
        return [_study(row) for row in self._db.execute(sql, (*values, limit, offset))]

    def find_instances(
        self, filters: InstanceFilters, limit: int, offset: int = 0
    ) -> list[InstanceRecord]:
        """Instance records (current placement applied) matching every filter: by study
        (in the order of its key), then series, SOP Instance UID and version."""
        conditions: list[tuple[str, object]] = []
        for column, uid in (
            ("study_instance_uid", filters.study_uid),
            ("series_instance_uid", filters.series_uid),
            ("sop_instance_uid", filters.sop_uid),
        ):
            if uid is not None:
                conditions += [
                    (f"i.{_KEYS[column]} = ?", uid_key(uid)),
                    (f"i.{column} = ?", pack_uid(uid)),
                ]
        if filters.modality is not None:
            code = self._codes.known(filters.modality)
            if code is None:
                return []
            conditions.append(("i.modality = ?", code))
        conditions += [
            ("i.study_date >= ?", _days(filters.date_from)),
            ("i.study_date <= ?", _days(filters.date_to)),
            # Instances deleted at their study's retention end are never found.
            ("coalesce(p.tier, i.tier) != ?", self._codes.known(DELETED)),
        ]
        where, values = _where(conditions)
        # Studies in the order of their keys, which the B-tree holds: a search with no
        # study in it pages through the archive without sorting it.
        sql = (
            f"{_SELECT} WHERE {where} ORDER BY i.study_key, i.study_instance_uid, "
            "i.series_instance_uid, i.sop_instance_uid, i.version LIMIT ? OFFSET ?"
        )
        return [self._record(row) for row in self._db.execute(sql, (*values, limit, offset))]

    # -- tiering ------------------------------------------------------------------------

    def due_studies(
        self, upto: datetime, after: tuple[int, str] | None, limit: int, *, every: bool = False
    ) -> list[tuple[StudyRow, tuple[int, str]]]:
        """Up to ``limit`` studies (not deleted) the tiering policy must look at before
        ``upto`` — changed since it last did, or whose due moment has come — after the
        position ``after`` (each row comes with its own position, to page on). One range
        of one B-tree: the cost grows with those studies, not with the archive. With
        ``every``, every study (a policy whose due moments were never computed)."""
        where = "coalesce(tier, '') != ?"
        values: list[Any] = [DELETED]
        if not every:
            where += " AND tier_due < ?"
            values.append(_micros_of(upto))
        if after is not None:
            where += " AND (tier_due, study_instance_uid) > (?, ?)"
            values += [after[0], pack_uid(after[1])]
        sql = (
            f"SELECT {', '.join(_STUDY_COLUMNS)}, tier_due FROM studies WHERE {where} "
            "ORDER BY tier_due, study_instance_uid LIMIT ?"
        )
        found = []
        for row in self._db.execute(sql, (*values, limit)):
            study = _study(row[:-1])
            found.append((study, (int(row[-1]), study.study_instance_uid)))
        return found

    def studies_by_uid(self, study_uids: Sequence[str]) -> list[StudyRow]:
        found = []
        for uid in study_uids:
            row = self.study(uid)
            if row is not None and row.tier != DELETED:
                found.append(row)
        return found

    def tier_facts(
        self, study_instance_uid: str
    ) -> tuple[tuple[str, ...], datetime | None, tuple[str, ...]]:
        """A study's body parts (upper case), when its latest placement was made (None:
        never moved, in its tier since ingest) and the sources of its instances: what the
        policy reads beside its row."""
        key, uid = uid_key(study_instance_uid), pack_uid(study_instance_uid)
        parts = self._db.execute(
            "SELECT DISTINCT upper(c.value) FROM instances i JOIN codes c ON c.id = i.body_part"
            " WHERE i.study_key = ? AND i.study_instance_uid = ? AND c.value != ''",
            (key, uid),
        ).fetchall()
        sources = self._db.execute(
            "SELECT DISTINCT c.value FROM instances i JOIN codes c ON c.id = i.source"
            " WHERE i.study_key = ? AND i.study_instance_uid = ? AND c.value != ''",
            (key, uid),
        ).fetchall()
        (placed,) = self._db.execute(
            "SELECT max(p.placed_time) FROM instances i JOIN placements p ON p.sha256 = i.sha256"
            " WHERE i.study_key = ? AND i.study_instance_uid = ?",
            (key, uid),
        ).fetchone()
        return (
            tuple(sorted(part for (part,) in parts)),
            _from_micros(placed),
            tuple(sorted(source for (source,) in sources)),
        )

    def set_due(self, due: Sequence[tuple[str, datetime | None]]) -> None:
        """When the policy must look at each study again (None: not unless it changes).
        The caller reads the studies and sets their due moments in one step of the
        writer's loop, so no ingest, move or read of them can fall in between."""
        with self._db:
            self._db.executemany(
                "UPDATE studies SET tier_due = ? WHERE study_instance_uid = ?",
                [
                    (NEVER_DUE if moment is None else _micros_of(moment), pack_uid(uid))
                    for uid, moment in due
                ],
            )

    def policy_matches(self, digest: str) -> bool:
        """Whether the due moments were computed under the policy with this digest."""
        return self._meta().get("tier.policy") == digest

    def adopt_policy(self, digest: str) -> None:
        """Every study due now (one pass under a new policy), and the digest recorded."""
        with self._db:
            self._db.execute("UPDATE studies SET tier_due = 0 WHERE tier_due != 0")
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('tier.policy', ?)", (digest,)
            )

    def stored_by_tier(self) -> dict[str, int]:
        """Bytes stored in each tier (a scan of the study rows: for a plan's prices, not
        for the daily plan itself)."""
        rows = self._db.execute("SELECT tier, sum(bytes_stored) FROM studies GROUP BY tier")
        return {str(tier): int(total or 0) for tier, total in rows if tier != DELETED}

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
        row = self._db.execute(sql, (pack_uid(study_instance_uid),)).fetchone()
        return int(row[0]) if row else 0

    def dirty_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM studies WHERE dirty > 0").fetchone()[0])

    def mark_written(self, written: Iterable[tuple[StudyRow, int]]) -> None:
        """These study rows (each read with this change counter) are in the Delta table."""
        rows = list(written)
        with self._db:
            self._db.executemany(
                _WRITTEN,
                [
                    (study_date_partition(r).isoformat(), pack_uid(r.study_instance_uid))
                    for r, _ in rows
                ],
            )
            self._db.executemany(_CLEAN, [(pack_uid(r.study_instance_uid), gen) for r, gen in rows])
            self._db.executemany(_NOT_PENDING, [(pack_uid(r.study_instance_uid),) for r, _ in rows])

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
                        (
                            fold,
                            study_date_partition(row).isoformat(),
                            pack_uid(row.study_instance_uid),
                        )
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

    # -- rows in and out ----------------------------------------------------------------

    def _encode(self, name: str, batch: pa.RecordBatch) -> list[tuple[Any, ...]]:
        if name == INSTANCES:
            return self._instance_rows(batch)
        if name == PLACEMENTS:
            return self._placement_rows(batch)
        if name == IDENTITY:
            return list(_identity_rows(batch))
        return list(_access_rows(batch))

    def _write(self, name: str, rows: list[tuple[Any, ...]]) -> None:
        if name == IDENTITY:
            if (deleted := self._codes.known(DELETED)) is not None:  # a rebuild, say
                shredded = {
                    sha
                    for chunk, marks in _in_lists([sha for sha, _, _ in rows])
                    for (sha,) in self._db.execute(
                        f"SELECT sha256 FROM placements WHERE tier = ? AND sha256 IN ({marks})",
                        (deleted, *chunk),
                    )
                }
                rows = [row for row in rows if row[0] not in shredded]
            self._db.executemany(_IDENTIFY, [(sha, sealed) for sha, sealed, _ in rows])
            self._db.executemany(_TOKEN, [token for _, _, tokens in rows for token in tokens])
            return
        statement = {INSTANCES: _INSERT, PLACEMENTS: _PLACE, ACCESS: _ACCESSED}[name]
        self._db.executemany(statement, rows)
        if name == PLACEMENTS and (deleted := self._codes.known(DELETED)) is not None:
            # A deleted instance's sealed identity box goes from the index with it.
            gone = [(row[0],) for row in rows if row[1] == deleted]
            self._db.executemany("DELETE FROM identity WHERE sha256 = ?", gone)

    def _derive(self, study_uids: Iterable[str]) -> None:
        """Derive these studies' rows again (their last access is kept)."""
        for chunk, marks in _in_lists(sorted(set(study_uids))):
            keys = [uid_key(uid) for uid in chunk]
            uids = [pack_uid(uid) for uid in chunk]
            self._db.execute(_DERIVE.format(keys=marks, uids=marks), [*keys, *uids])

    def _instance_rows(self, batch: pa.RecordBatch) -> list[tuple[Any, ...]]:
        """Rows of ``instances`` (Arrow) as index rows; new codes are committed first.

        Converted a column at a time (``columns``): a rebuild converts every row of the
        archive, and a Python call per value was most of its time."""
        column = batch.column
        values: dict[str, list[Any]] = {name: column(name).to_pylist() for name in _PLAIN}
        for name in _CODED:
            strings = column(name)
            if name in LATER_INSTANCE_COLUMNS and strings.null_count:
                strings = pc.fill_null(strings, "")  # null in older rows
            values[name] = self._coded(strings)
        for name in _HEXED:
            values[name] = columns.pack_hex_column(column(name))
        for uid, key in _KEYS.items():
            uids = column(uid)
            if uid == "sop_instance_uid":  # one per row: nothing to share
                values[key] = [uid_key(value) for value in uids.to_pylist()]
            else:
                values[key] = columns.by_distinct(uids, _uid_keys)
            values[uid] = columns.pack_uid_column(uids)
        # Dates and times converted by column, in Arrow: Python objects for them would be
        # most of a rebuild's time.
        values["study_date"] = column("study_date").cast(pa.int32()).to_pylist()
        values["ingest_time"] = _micros(column("ingest_time"))
        prefixes = columns.by_distinct(column("study_instance_uid"), _study_prefixes)
        values["object_key"] = [
            (prefix is not None and pack_id_in(key, prefix)) or key
            for key, prefix in zip(column("object_key").to_pylist(), prefixes, strict=True)
        ]
        return list(zip(*(values[name] for name in _INSTANCE_COLUMNS), strict=True))

    def _placement_rows(self, batch: pa.RecordBatch) -> list[tuple[Any, ...]]:
        column = batch.column
        plain = ("bucket", "object_key", "byte_offset", "byte_length")
        values = {name: column(name).to_pylist() for name in plain}
        values["sha256"] = columns.pack_hex_column(column("sha256"))
        values["tier"] = self._coded(column("tier"))
        values["key_id"] = self._coded(column("key_id"))
        values["placed_time"] = _micros(column("placed_time"))
        # Null or empty: the instance's own (an older row, or a move that kept it).
        values["transfer_syntax_stored"] = self._coded(column("transfer_syntax_stored"), True)
        return list(zip(*(values[name] for name in _PLACEMENT_COLUMNS), strict=True))

    def _coded(self, strings: pa.Array, empty_as_none: bool = False) -> list[Any]:
        """The code of each string (new ones committed first), asked once per distinct
        string; null (and with ``empty_as_none`` an empty string) as None."""

        def codes(values: list[str]) -> list[int | None]:
            if not empty_as_none:
                return list(self._codes.ids(values))
            found = iter(self._codes.ids([value for value in values if value]))
            return [next(found) if value else None for value in values]

        return columns.by_distinct(strings, codes)

    def _record(self, row: Sequence[Any]) -> InstanceRecord:
        values = dict(zip(RECORD_FIELDS, row, strict=True))
        for name in _CODED:
            code = values[name]
            values[name] = "" if code is None else self._codes.value(code)  # older rows
        for name in _HEXED:
            values[name] = _unpacked(values[name])
        for name in _KEYS:
            values[name] = _unuid(values[name])
        days = values["study_date"]
        values["study_date"] = None if days is None else _EPOCH_DAY + timedelta(days=days)
        values["ingest_time"] = _from_micros(values["ingest_time"])
        if isinstance(values["object_key"], bytes):
            values["object_key"] = pack_key_from(values["object_key"], values["study_instance_uid"])
        return InstanceRecord(**values)

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


class StaleIndexError(Exception):
    """The index cannot be brought up to date; it is rebuilt."""


class _Codes:
    """The ``codes`` table, remembered in both directions (a few hundred strings)."""

    _REMEMBERED = 100_000  # forgotten past this many: a pathological variety of notes

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._ids: dict[str, int] = {}
        self._values: dict[int, str] = {}

    def forget(self) -> None:
        self._ids.clear()
        self._values.clear()

    def ids(self, values: Sequence[str]) -> list[int]:
        """The code of each of ``values``, new ones added (and committed: a code is never
        taken back, so that a rolled back transaction cannot leave one remembered)."""
        missing = {value for value in values if value not in self._ids}
        if missing:
            if len(self._ids) + len(missing) > self._REMEMBERED:
                self.forget()
                missing = set(values)  # those known a moment ago too
            # Never inside another transaction: its rollback would take codes back that
            # are remembered here.
            assert not self._db.in_transaction, "codes are added between transactions"
            self._db.executemany(
                "INSERT OR IGNORE INTO codes (value) VALUES (?)", [(v,) for v in missing]
            )
            for chunk, marks in _in_lists(sorted(missing)):
                sql = f"SELECT id, value FROM codes WHERE value IN ({marks})"
                for code, value in self._db.execute(sql, chunk):
                    self._ids[value] = code
                    self._values[code] = value
            self._db.commit()
        return [self._ids[value] for value in values]

    def known(self, value: str) -> int | None:
        """The code of ``value``, None if no row has it."""
        if value not in self._ids:
            row = self._db.execute("SELECT id FROM codes WHERE value = ?", (value,)).fetchone()
            if row is None:
                return None
            self._ids[value], self._values[row[0]] = row[0], value
        return self._ids[value]

    def value(self, code: int) -> str:
        if code not in self._values:
            (value,) = self._db.execute("SELECT value FROM codes WHERE id = ?", (code,)).fetchone()
            self._values[code], self._ids[value] = value, code
        return self._values[code]


def uid_key(uid: str) -> int:
    """The index's key of a UID: a 47-bit hash (six bytes in a SQLite row), equal for equal
    UIDs; rows found by it are checked against the UID itself."""
    digest = hashlib.blake2b(uid.encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big", signed=True)


def _uid_keys(uids: list[str]) -> list[int]:
    return [uid_key(uid) for uid in uids]


def _study_prefixes(study_uids: list[str]) -> list[str]:
    return [study_prefix(uid) for uid in study_uids]


# The inverse of ``columns.pack_uid``'s translation.
_HEX_TO_UID = str.maketrans("123456789ab", ".0123456789")


def _uid_or_none(value: str | None) -> bytes | str | None:
    return None if value is None else pack_uid(value)


def _unuid(value: bytes | str) -> str:
    return value.hex().rstrip("0").translate(_HEX_TO_UID) if isinstance(value, bytes) else value


def _packed_or_none(value: str | None) -> bytes | str | None:
    return None if value is None else pack_hex(value)


def _unpacked(value: bytes | str) -> str:
    return value.hex() if isinstance(value, bytes) else value


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread=False: opened in a loading thread, then used by the actor's event
    # loop only (never two threads at once).
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a power cut may lose the last transactions, never corrupt the file; what
    # is lost is caught up from the tables and the journal.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return connection


_OWN_TABLES = (
    "instances",
    "codes",
    "placements",
    "studies",
    "meta",
    "journal",
    "files",
    "identity",
    "identity_tokens",
)


# Timestamps are integer microseconds since the epoch (UTC) in the index, dates ISO text
# in ``studies`` and days since the epoch in ``instances``: all compare and sort as they
# should, and Arrow converts whole columns to them at once.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1)


def _since(started: float) -> float:
    return time.monotonic() - started


def _micros(column: pa.Array | pa.ChunkedArray) -> list[int]:
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()  # type: ignore[no-any-return]


def _days(day: date | None) -> int | None:
    return None if day is None else (day - _EPOCH_DAY).days


def _micros_of(moment: datetime) -> int:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _from_micros(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def token_key(token: str) -> int:
    """A blind token (hex) as the 47-bit integer the index keeps of it."""
    return int(token[:12], 16) >> 1


def _identity_rows(
    batch: pa.RecordBatch,
) -> Iterator[tuple[bytes | str, bytes, list[tuple[int, bytes | str]]]]:
    """(SHA-256, sealed box, [(token key, study)]) of each identity row."""
    for sha, study, tokens, sealed in zip(
        batch.column("sha256").to_pylist(),
        batch.column("study_instance_uid").to_pylist(),
        batch.column("tokens").to_pylist(),
        batch.column("sealed").to_pylist(),
        strict=True,
    ):
        packed = pack_uid(study)
        yield pack_hex(sha), sealed, [(token_key(token), packed) for token in tokens]


def _access_rows(batch: pa.RecordBatch) -> Iterator[tuple[Any, ...]]:
    uids = [pack_uid(uid) for uid in batch.column("study_instance_uid").to_pylist()]
    for uid, moment in zip(uids, _micros(batch.column("access_time")), strict=True):
        yield moment, uid, moment


def _study(row: Sequence[Any]) -> StudyRow:
    values: dict[str, Any] = dict(zip(_STUDY_COLUMNS, row, strict=True))
    values["modalities"] = sorted(
        m for m in (values["modalities"] or "").split(MODALITY_SEPARATOR) if m
    )
    day = values["study_date"]
    values["study_date"] = date.fromisoformat(day) if day else None
    values["study_instance_uid"] = _unuid(values["study_instance_uid"])
    for name in ("patient_pseudonym", "accession_pseudonym"):
        values[name] = _unpacked(values[name])
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


def _where(conditions: Sequence[tuple[str, object]]) -> tuple[str, list[Any]]:
    clauses = [sql for sql, value in conditions if value is not None]
    values = [value for _, value in conditions if value is not None]
    return (" AND ".join(clauses) if clauses else "1"), values


def _table_id(table: DeltaTable) -> str:
    return str(table.metadata().id)


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
    # A table written before a later column has none: it reads as null (a string).
    present = [name for name in columns if name in dataset.schema.names]
    # One batch decoded at a time: the readahead's defaults hold about a million rows.
    for batch in dataset.to_batches(
        columns=present, batch_size=_BATCH, batch_readahead=1, fragment_readahead=1
    ):
        if len(present) == len(columns):
            yield batch
            continue
        arrays = {name: batch.column(name) for name in present}
        yield pa.RecordBatch.from_arrays(
            [arrays.get(name, pa.nulls(batch.num_rows, pa.string())) for name in columns],
            names=list(columns),
        )


def log_actions(
    table: DeltaTable, options: Mapping[str, str], version: int
) -> list[dict[str, Any]]:
    """The actions of one commit of ``table`` (its ``_delta_log`` entry, JSON lines).

    delta-rs's Python API gives no per-commit actions. Raises StaleIndexError when the entry
    is gone (cleaned up after a checkpoint, past the retention window)."""
    path = f"{table_root(table)}/_delta_log/{version:020d}.json"
    try:
        with s3_filesystem(options).open_input_stream(path) as stream:
            return [json.loads(line) for line in stream.read().splitlines() if line]
    except (OSError, ValueError) as error:
        raise StaleIndexError(f"commit {version} of {table_root(table)} cannot be read") from error


def data_files(
    table: DeltaTable, options: Mapping[str, str], since: int, skip: set[int]
) -> set[str]:
    """The files of ``table``'s current version holding the rows that commits after
    version ``since`` (except those in ``skip``) added.

    A commit whose adds all say ``dataChange: false`` (a compaction) adds no row, and is
    passed over, unless it rewrote a file that holds such rows: then its output is read
    instead (the index takes rows it holds already as they are). Raises StaleIndexError when a
    commit cannot be read, or the files are no longer in the table.
    """
    wanted: set[str] = set()
    for version in range(since + 1, table.version() + 1):
        if version in skip:
            continue
        actions = log_actions(table, options, version)
        added = {
            urllib.parse.unquote(action["add"]["path"]): action["add"].get("dataChange", True)
            for action in actions
            if "add" in action
        }
        removed = {urllib.parse.unquote(a["remove"]["path"]) for a in actions if "remove" in a}
        wanted |= {path for path, changes in added.items() if changes}
        if removed & wanted:
            wanted = (wanted - removed) | set(added)
    current = {
        urllib.parse.unquote(path)
        for path in table.get_add_actions(flatten=True).column("path").to_pylist()
    }
    if not wanted <= current:
        raise StaleIndexError(f"{len(wanted - current)} files added since {since} are gone")
    return wanted


def _in_lists(values: Sequence[Any]) -> Iterator[tuple[Sequence[Any], str]]:
    """``values`` in runs short enough for one SQL ``IN (?, …)``, each with its marks."""
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        yield chunk, ", ".join("?" * len(chunk))
