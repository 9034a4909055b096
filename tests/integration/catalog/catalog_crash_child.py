"""A catalog writer that repeats one step until it is killed (by test_catalog_crash).

Run as ``python -m tests.integration.catalog.catalog_crash_child STEP BUCKET INDEX PREFIX`` with
the store's settings as JSON in ``STRATA_TEST_STORE``. STEP is ``commit`` (a group commit
to the journal), ``flush`` (the journal appended to Delta), ``compact``, ``checkpoint`` or
``vacuum``. It prints one line per event, flushed at once:

- ``begin STEP TABLE`` just before a step starts, ``end STEP TABLE SECONDS`` once it
  returned (a maintenance pass does each step once per table, vacuum twice: the files
  commits removed, then those no log entry names);
- ``acked SHA256 …`` with the rows of a group commit, only after ``commit`` returned them.

For ``flush``, a flush follows every group commit; for a maintenance step, a pass (which
flushes first) follows every ``COMMITS_PER_PASS`` group commits, so that there are small
files to compact and old ones to vacuum. Steps are marked by wrapping the functions that do
them (the writer's append of the journal, delta-rs's methods): the flushes and passes
themselves are the writer's own (``flush_now``, ``maintain_now``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from deltalake import DeltaTable
from deltalake.table import TableOptimizer

from cluster.catalog import CatalogWriter, writer
from cluster.catalog.maintenance import MaintenancePolicy
from tests.integration.conftest import make_record, stored
from workers.records import StoreSettings

ROWS_PER_COMMIT = 200
COMMITS_PER_PASS = 3
# Rows spread over this many days, so partitions of ``ingest_date``: a commit or a
# compaction writes that many files before its one log entry, and a kill between two of
# them leaves files that no version uses.
INGEST_DAYS = 8
MAX_CYCLES = 200  # never runs on for long if the test that started it is gone
# Retention 0: vacuum deletes every file the latest version does not use (safe here: no
# commit runs during a pass). No pass runs by itself; the child starts each one. Two small
# files in a partition are compacted.
POLICY = MaintenancePolicy(
    every_flushes=10**9, retention_hours=0, orphan_hours=0, compact_min_files=2
)


def say(*words: object) -> None:
    print(*words, flush=True)


def _table_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _marked(step: str, method: Callable[..., Any], table_of: Callable[[Any], DeltaTable]) -> Any:
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = _table_name(table_of(self).table_uri)
        say("begin", step, name)
        started = time.perf_counter()
        result = method(self, *args, **kwargs)
        say("end", step, name, f"{time.perf_counter() - started:.4f}")
        return result

    return run


def _mark_flushes() -> None:
    # The writer's append of its journal to a table (its first argument).
    writer._append_journal = _marked(  # type: ignore[assignment]
        "flush", writer._append_journal, lambda table: table
    )


def _mark_maintenance_steps() -> None:
    TableOptimizer.compact = _marked(  # type: ignore[method-assign]
        "compact", TableOptimizer.compact, lambda optimizer: optimizer.table
    )
    DeltaTable.create_checkpoint = _marked(  # type: ignore[method-assign]
        "checkpoint", DeltaTable.create_checkpoint, lambda table: table
    )
    DeltaTable.vacuum = _marked(  # type: ignore[method-assign]
        "vacuum", DeltaTable.vacuum, lambda table: table
    )


async def run(step: str, bucket: str, index_path: str, prefix: str) -> None:
    settings = StoreSettings(**json.loads(os.environ["STRATA_TEST_STORE"]))
    catalog = CatalogWriter(
        settings,
        bucket,
        max_batch=ROWS_PER_COMMIT,
        max_wait_s=0.0,
        index_path=index_path,
        maintenance=POLICY,
    )
    await catalog.ready()
    say("ready")
    if step == "flush":
        _mark_flushes()
    elif step != "commit":
        _mark_maintenance_steps()
    today = datetime.now(UTC)
    for cycle in range(MAX_CYCLES):
        group = [
            stored(
                make_record(
                    f"{prefix}.{cycle}.{n}",
                    study_uid=f"{prefix}.{cycle % 3}",
                    ingest_time=today - timedelta(days=n % INGEST_DAYS),
                )
            )
            for n in range(ROWS_PER_COMMIT)
        ]
        if step == "commit":
            say("begin commit instances")
        started = time.perf_counter()
        committed = await catalog.commit(group)
        if step == "commit":
            say("end commit instances", f"{time.perf_counter() - started:.4f}")
        say("acked", *(c.record.sha256 for c in committed if c.status == "stored"))
        if step == "flush":
            await catalog.flush_now(raise_errors=True)
        elif step != "commit" and cycle % COMMITS_PER_PASS == COMMITS_PER_PASS - 1:
            await catalog.maintain_now()


if __name__ == "__main__":
    asyncio.run(run(*sys.argv[1:5]))
