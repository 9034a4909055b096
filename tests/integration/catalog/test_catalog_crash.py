"""The catalog writer killed (SIGKILL) during a group commit, a flush of its journal, a
compaction, a checkpoint or a vacuum, on a real MinIO: no acknowledged row is lost or
written twice, the tables stay readable, a new writer over the same index catches up, and
the next maintenance pass succeeds and leaves no file that the tables do not use.

The writer runs in a child process (``catalog_crash_child``) that repeats one step and
prints a line just before each step starts and once it ended (with its duration). The
test waits for the start of a step, then a fraction of that step's last measured
duration, and kills the child; a kill counts as "mid-step" when the child printed no end
for the step. Each step is killed at several fractions, over the same table and index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from cluster import catalog
from cluster.catalog import CatalogWriter
from cluster.catalog.maintenance import maintain
from cluster.catalog.queries import dataset
from cluster.ops.minio import MinioServer
from tests.integration.catalog.catalog_crash_child import POLICY
from tests.integration.conftest import stored
from workers.objects import store
from workers.records import StoreSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_ROOT = Path(__file__).parents[3]
_CHILD = "tests.integration.catalog.catalog_crash_child"
# Where the kill falls in the step, as fractions of its last measured duration.
KILL_AT = (0.15, 0.5, 0.85)
LINE_TIMEOUT_S = 60.0
CHILD_DEADLINE_S = 120.0


@dataclasses.dataclass
class Kill:
    """One kill: when it fell after the step began, and the child's last marker."""

    step: str
    delay_s: float
    step_s: float
    last_marker: str
    orphans: int = 0  # data files left that no log entry names

    @property
    def mid_step(self) -> bool:
        return self.last_marker.startswith(f"begin {self.step} ")


class Child:
    """A writer process, its output read by a thread (so that it never blocks on a full
    pipe: it must die inside the step, not inside a print)."""

    def __init__(
        self, step: str, settings: StoreSettings, bucket: str, index: Path, prefix: str
    ) -> None:
        self.step = step
        self.stderr_path = index.with_name(f"child-{prefix.rsplit('.', 1)[-1]}.log")
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
            "STRATA_TEST_STORE": json.dumps(dataclasses.asdict(settings)),
        }
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", _CHILD, step, bucket, str(index), prefix],
                cwd=_ROOT,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.acked: set[str] = set()
        self.last_marker = self.previous_marker = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next_line(self) -> str | None:
        """The next line, noting acks and markers; None once the child's output ended."""
        try:
            line = self._lines.get(timeout=LINE_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"the child printed nothing for {LINE_TIMEOUT_S} s") from None
        if line is None:
            return None
        words = line.split()
        if words[0] == "acked":
            self.acked.update(words[1:])
        self.previous_marker, self.last_marker = self.last_marker, " ".join(words[:3])
        return line

    def kill_inside(self, fraction: float, step_s: float | None) -> tuple[Kill, float]:
        """Kill the child ``fraction`` of the step's duration after the step began on
        ``instances``, once it has acked rows (the duration measured on a first whole
        step when ``step_s`` is None); returns the kill and the step's latest measured
        duration. Calls of one step in a row (vacuum's two) count as one step."""
        mine = [self.step, "instances"]
        deadline = time.monotonic() + CHILD_DEADLINE_S
        span = 0.0  # the step's calls in a row so far
        while (line := self.next_line()) is not None:
            assert time.monotonic() < deadline, f"no {self.step} to kill in {CHILD_DEADLINE_S} s"
            words = line.split()
            if words[1:3] != mine:
                continue
            if words[0] == "end":
                span += float(words[3])
                step_s = span
            elif self.previous_marker == " ".join(["end", *mine]):
                continue  # the step's next call
            elif step_s is None or not self.acked:
                span = 0.0
            else:
                delay = fraction * step_s
                time.sleep(delay)
                self.process.send_signal(signal.SIGKILL)
                break
        else:
            raise AssertionError(f"the child ended by itself:\n{self.stderr()}")
        assert self.process.wait(timeout=30) == -signal.SIGKILL
        while self.next_line() is not None:  # what it printed before it died counts
            pass
        return Kill(self.step, delay, step_s, self.last_marker), step_s

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:]


def _table(settings: StoreSettings, bucket: str, name: str) -> DeltaTable:
    return DeltaTable(
        catalog.table_uri(bucket, name), storage_options=catalog.storage_options(settings)
    )


async def _reopen_and_recommit(
    settings: StoreSettings, bucket: str, index: Path, acked: set[str]
) -> None:
    """A new writer over the same index finds every acked row and takes each again for a
    duplicate."""
    writer = CatalogWriter(
        settings, bucket, max_wait_s=0.0, index_path=str(index), maintenance=POLICY
    )
    found = {sha: await writer.lookup_sha256(sha) for sha in sorted(acked)}
    missing = [sha for sha, record in found.items() if record is None]
    assert not missing, f"{len(missing)} acked rows unknown to the reopened writer"
    again = await writer.commit([stored(record) for record in found.values() if record])
    assert Counter(c.status for c in again) == {"duplicate": len(acked)}
    await writer.close()


def _unused_files(settings: StoreSettings, bucket: str, name: str) -> set[str]:
    """Data files of the table in the bucket that its latest version does not use."""
    table = _table(settings, bucket, name)
    used = {uri.removeprefix(f"s3://{bucket}/") for uri in table.file_uris()}
    present = store.list_keys(settings, bucket, f"{name}/")
    return {key for key in present if not key.startswith(f"{name}/_delta_log/")} - used


def _orphans(settings: StoreSettings, bucket: str) -> int:
    """How many data files no log entry names (written by a commit or a compaction that
    never landed), as opposed to files a commit removed."""
    count = 0
    for name in (catalog.INSTANCES, catalog.STUDIES):
        removed = _table(settings, bucket, name).vacuum(
            retention_hours=0, dry_run=True, enforce_retention_duration=False
        )
        count += len(_unused_files(settings, bucket, name) - {f"{name}/{p}" for p in removed})
    return count


def _check_after_kill(settings: StoreSettings, bucket: str, index: Path, acked: set[str]) -> int:
    """Assert that the kill lost nothing and left tables that a new writer and the next
    maintenance pass take up; returns how many files the kill left that no log names."""
    # (1) Both tables open and read.
    _table(settings, bucket, catalog.INSTANCES).to_pyarrow_table()
    _table(settings, bucket, catalog.STUDIES).to_pyarrow_table()
    # (2) Every acked row is in the catalog (the table, or the journal groups it does not
    # hold yet) once; no row at all is there twice.
    rows = dataset(settings, bucket, catalog.INSTANCES).to_table()
    counts = Counter(rows.column("sha256").to_pylist())
    lost = [sha for sha in acked if counts[sha] == 0]
    assert not lost, f"{len(lost)} of {len(acked)} acked rows lost"
    twice = [sha for sha, count in counts.items() if count > 1]
    assert not twice, f"{len(twice)} rows written more than once"
    orphans = _orphans(settings, bucket)

    # (3) A new writer catches up, answers for every acked row, writes none again, and
    # flushes every one into the table once.
    asyncio.run(_reopen_and_recommit(settings, bucket, index, acked))
    rows = _table(settings, bucket, catalog.INSTANCES).to_pyarrow_table()
    assert Counter(Counter(rows.column("sha256").to_pylist()).values()) == {1: len(counts)}
    assert not list(store.list_keys(settings, bucket, "journal/"))
    # It has written the study rows a kill left unwritten: they agree with the instances.
    per_study = Counter(rows.column("study_instance_uid").to_pylist())
    studies = _table(settings, bucket, catalog.STUDIES).to_pyarrow_table().to_pylist()
    assert {s["study_instance_uid"]: s["instance_count"] for s in studies} == per_study
    assert len(studies) == len(per_study)

    # (4) The next maintenance pass succeeds and keeps every row.
    maintain(settings, bucket, POLICY)
    assert _table(settings, bucket, catalog.INSTANCES).to_pyarrow_table().num_rows == rows.num_rows
    # (5) After its vacuum (no retention), every data file left is one the table uses.
    for name in (catalog.INSTANCES, catalog.STUDIES):
        left = _unused_files(settings, bucket, name)
        assert not left, f"{name}: files left behind {sorted(left)}"
    return orphans


@pytest.mark.parametrize("step", ["commit", "flush", "compact", "checkpoint", "vacuum"])
def test_writer_killed_during_a_step_loses_no_acked_row(
    step: str, minio: MinioServer, bucket_name: str, tmp_path: Path
) -> None:
    settings = minio.settings
    index = tmp_path / "index.sqlite"
    acked: set[str] = set()
    kills: list[Kill] = []
    step_s: float | None = None
    started = time.perf_counter()
    for number, fraction in enumerate(KILL_AT):
        child = Child(step, settings, bucket_name, index, f"1.2.826.0.1.3680043.8.498.77.{number}")
        try:
            kill, step_s = child.kill_inside(fraction, step_s)
        finally:
            child.stop()
        acked |= child.acked
        kill.orphans = _check_after_kill(settings, bucket_name, index, acked)
        kills.append(kill)

    mid = sum(kill.mid_step for kill in kills)
    print(
        f"\n{step}: {mid} of {len(kills)} kills mid-step, {len(acked)} acked rows, "
        f"{time.perf_counter() - started:.1f} s; "
        + "; ".join(
            f"{k.delay_s * 1000:.0f}/{k.step_s * 1000:.0f} ms: {k.last_marker}, "
            f"{k.orphans} files unnamed by the log"
            for k in kills
        )
    )
    assert len(acked) > 0
    # Each kill is timed to fall inside the step; if none did, the test tested nothing.
    assert mid > 0, kills


def test_files_no_log_names_are_vacuumed_only_once_old(
    minio: MinioServer, bucket_name: str
) -> None:
    # A commit in progress has such files too: the pass of a writer that goes on
    # committing must leave young ones alone, even with no time-travel window.
    settings = minio.settings
    catalog.create_tables(settings, bucket_name)
    key = f"{catalog.INSTANCES}/ingest_date=2024-03-01/part-00000-unnamed.parquet"
    store.put(settings, bucket_name, key, b"written by a commit that has not landed")
    maintain(settings, bucket_name, dataclasses.replace(POLICY, orphan_hours=1))
    assert store.exists(settings, bucket_name, key)
    maintain(settings, bucket_name, POLICY)  # orphan_hours=0: nothing commits meanwhile
    assert not store.exists(settings, bucket_name, key)
