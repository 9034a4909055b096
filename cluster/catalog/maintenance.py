"""Keeping the catalog's tables cheap to open and to read as they grow.

Each flush of the journal adds a file per partition it touches, and each fold appends
and rewrites a few study rows; left alone, a table grows by files and log entries, and
every reader and writer pays for all of them. The writer therefore maintains its tables
itself, every ``every_flushes`` flushes, in the background:

- compaction rewrites the small files of a partition that has gathered
  ``compact_min_files`` of them into files of about ``target_file_bytes`` (a commit that
  changes no data, so readers and the append-only property are unaffected). Flushes of a
  busy archive write large files, which are never rewritten; a quiet one writes a small
  file every ``flush_interval_s``, merged a few times a day: every rewrite keeps a copy on
  disk for the time-travel window, so the fewer the better;
- a checkpoint summarises the log, so opening a table reads one Parquet file and the few
  log entries after it instead of every entry since the table was created;
- vacuum deletes the files that no version younger than ``retention_hours`` uses (the
  time-travel window), and expired log entries go with them.

Every step is one atomic Delta operation: a writer killed in the middle of one leaves the
table at the version before or after it, and files a killed commit or compaction wrote
but never committed are deleted by a later vacuum, once ``orphan_hours`` old
(tests/integration/test_catalog_crash.py kills the writer in each step).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from deltalake import DeltaTable

from cluster.catalog.schema import TABLES, open_table
from workers.records import StoreSettings

log = logging.getLogger("strata.catalog")

MiB = 1024 * 1024
_LOG_RETENTION = "delta.logRetentionDuration"


@dataclass(frozen=True)
class MaintenancePolicy:
    """How often and how far the writer maintains its tables."""

    every_flushes: int = 12
    retention_hours: int = 168  # a week of time travel
    target_file_bytes: int = 128 * MiB
    compact_min_files: int = 16  # small files a partition gathers before they are merged
    # Files that no version names (a writer killed in the middle of a commit or a
    # compaction left them) are deleted once older than this and the retention window. A
    # commit in progress has such files too until its log entry lands, so this must outlast
    # any commit and any pass: 0 only while nothing commits during the pass (tests).
    orphan_hours: int = 1


@dataclass
class MaintenanceReport:
    """What one maintenance pass did, per table."""

    files_removed_by_compaction: dict[str, int] = field(default_factory=dict)
    files_added_by_compaction: dict[str, int] = field(default_factory=dict)
    files_vacuumed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def crowded_partitions(table: DeltaTable, target_bytes: int, min_files: int = 2) -> list[str]:
    """The partitions of ``table`` holding at least ``min_files`` files under a quarter of
    ``target_bytes``: the only ones a compaction pass rewrites.

    delta-rs 1.6 bin-packs every file under the target in a partition it compacts, and
    rewrites even a bin of one file when the partition has several bins: left to itself,
    each pass would rewrite every closed day's files again. A day that was compacted
    keeps files near the target and at most one small rest, and is left alone.
    """
    column = table.metadata().partition_columns[0]
    actions = table.get_add_actions(flatten=True)
    small: Counter[str] = Counter()
    for value, size in zip(
        actions.column(f"partition.{column}").to_pylist(),
        actions.column("size_bytes").to_pylist(),
        strict=True,
    ):
        if size < target_bytes // 4:
            small[str(value)] += 1
    return sorted(value for value, count in small.items() if count >= max(2, min_files))


def maintain(settings: StoreSettings, bucket: str, policy: MaintenancePolicy) -> MaintenanceReport:
    """Compact, checkpoint and vacuum every catalog table; blocking (run it in a thread)."""
    started = time.monotonic()
    report = MaintenanceReport()
    window = f"interval {policy.retention_hours} hours"
    for name in TABLES:
        table = open_table(settings, bucket, name)
        if table.metadata().configuration.get(_LOG_RETENTION) != window:
            # Log entries older than the window go at checkpoints, like the files.
            table.alter.set_table_properties({_LOG_RETENTION: window})
        report.files_removed_by_compaction[name] = 0
        report.files_added_by_compaction[name] = 0
        crowded = crowded_partitions(table, policy.target_file_bytes, policy.compact_min_files)
        if crowded:
            column = table.metadata().partition_columns[0]
            metrics = table.optimize.compact(
                partition_filters=[(column, "in", crowded)],
                target_size=policy.target_file_bytes,
            )
            report.files_removed_by_compaction[name] = int(metrics.get("numFilesRemoved", 0))
            report.files_added_by_compaction[name] = int(metrics.get("numFilesAdded", 0))
        table.update_incremental()
        table.create_checkpoint()
        removed = table.vacuum(
            retention_hours=policy.retention_hours,
            dry_run=False,
            # The window is the operator's choice (configuration), not delta-rs's default.
            enforce_retention_duration=False,
        )
        # That "lite" vacuum deletes only files that a commit removed; files no log entry
        # names would stay forever without a "full" one, later than the window too.
        removed += table.vacuum(
            retention_hours=max(policy.retention_hours, policy.orphan_hours),
            dry_run=False,
            enforce_retention_duration=False,
            full=True,
        )
        report.files_vacuumed[name] = len(removed)
        table.cleanup_metadata()
    report.seconds = time.monotonic() - started
    log.info(
        "catalog maintained in %.1f s: compacted %s files into %s, vacuumed %s",
        report.seconds,
        report.files_removed_by_compaction,
        report.files_added_by_compaction,
        report.files_vacuumed,
    )
    return report
