"""`strata catalog rebuild` against a real node: files ingested through the whole stack, the
catalog (its bucket's contents and the writer's index) deleted, rebuilt from the objects
alone, and compared row for row with what the node had written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from deltalake import DeltaTable
from pydicom.data import get_testdata_file

from cluster import catalog, cli
from cluster.catalog.index import SOURCES, CatalogIndex
from cluster.catalog.queries import dataset
from cluster.client import StrataClient
from cluster.ops.minio import MinioServer
from tests.integration.conftest import ct_instances
from tests.integration.node import Node
from workers.objects import store
from workers.objects.envelope import keys_key_for
from workers.records import StoreSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CATALOG = "strata-catalog"
HOT = "strata-hot"
GARBAGE_KEY = store.study_prefix("1.2.826.0.1.3680043.10.9") + "0" * 32
# Stored as received (encapsulated, deflated, no pixel data) or zstd-compressed.
AS_RECEIVED = ("JPEG2000.dcm", "image_dfl.dcm", "rtplan.dcm", "SC_rgb_32bit.dcm")


def _version_of(data: bytes, description: str) -> bytes:
    """Another file with the same SOP Instance UID: a new version of the instance."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.SeriesDescription = description
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write(folder: Path, files: list[tuple[str, bytes]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files:
        path = folder / f"{name}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _rows(settings: StoreSettings, table: str) -> list[dict[str, Any]]:
    rows = DeltaTable(
        catalog.table_uri(CATALOG, table), storage_options=catalog.storage_options(settings)
    ).to_pyarrow_table()
    key = "sha256" if table == catalog.INSTANCES else "study_instance_uid"
    if table == catalog.ACCESS:
        key = "access_time"
    return sorted(rows.to_pylist(), key=lambda row: str(row[key]))


def _phi(paths: list[Path]) -> set[str]:
    """Patient names and IDs of the inputs."""
    found = set()
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID"):
            value = str(dataset.get(keyword, "") or "").strip()
            if len(value) >= 4:
                found.add(value)
    return found


def _wait_for_an_access(node: Node, seconds: float = 120) -> None:
    """Until the access record, which the node commits in the background, is in the
    catalog (its journal until the node flushes it)."""
    settings = StoreSettings(**json.loads((node.data_dir / "node.json").read_text())["store"])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if dataset(settings, CATALOG, catalog.ACCESS).count_rows():
            return
        time.sleep(0.5)
    raise AssertionError(f"no access recorded after {seconds:g} s")


def strata_rebuild(node: Node, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "cluster.cli", "catalog", "rebuild"),
            *("--data-dir", str(node.data_dir), *flags),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "STRATA_KEY_FILE": str(node.key_file)},
    )


@dataclass(frozen=True)
class Rebuilt:
    node: Node
    files: dict[str, bytes]  # name -> bytes, for every file stored
    phi: set[str]
    instances: list[dict[str, Any]]  # as the node wrote them
    studies: list[dict[str, Any]]
    rebuilt_instances: list[dict[str, Any]]
    rebuilt_studies: list[dict[str, Any]]
    rebuilt_access: list[dict[str, Any]]
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rebuilt]:
    root = tmp_path_factory.mktemp("rebuild")
    first = ct_instances(3, "a") + ct_instances(2, "b")
    first += [(name, Path(get_testdata_file(name)).read_bytes()) for name in AS_RECEIVED]
    second = [("a-000-v2", _version_of(first[0][1], "second version"))]
    third = [("a-000-v3", _version_of(first[0][1], "third version")), ("a-000-again", first[0][1])]
    node = Node(root)
    node.start()
    try:
        paths = []
        with StrataClient(node.address) as client:
            for number, batch in enumerate((first, second, third)):
                paths += _write(root / f"files-{number}", batch)
                outcomes = client.ingest_files(paths[-len(batch) :])
                statuses = {Path(o.source).stem: o.status for o in outcomes}
                assert statuses == {
                    name: "duplicate" if name.endswith("again") else "stored" for name, _ in batch
                }
            # A read, so that one study has an access (which a rebuild loses).
            client.retrieve(pydicom.dcmread(paths[-1], stop_before_pixels=True).SOPInstanceUID)
        _wait_for_an_access(node)
        node.stop()

        with MinioServer(node.data_dir / "minio") as server:
            settings = server.settings
            instances = _rows(settings, catalog.INSTANCES)
            studies = _rows(settings, catalog.STUDIES)
            assert _rows(settings, catalog.ACCESS)
            # The catalog is lost: its bucket's contents and the writer's index.
            for key in list(store.list_keys(settings, CATALOG)):
                store.delete(settings, CATALOG, key)
            shutil.rmtree(node.data_dir / "catalog-index")
            # Two packs no row can come from: garbage, and a real pack of one member copied
            # with another pack's keys object (its member fails; the pack's other rows, had
            # it any, would not).
            store.put(settings, HOT, GARBAGE_KEY, b"not a Strata object")
            store.put(settings, HOT, keys_key_for(GARBAGE_KEY), b"{}")
            alone = _pack_of_one(instances)
            other = next(r["object_key"] for r in instances if r["object_key"] != alone)
            moved = alone[:-32] + "f" * 32
            store.put(settings, HOT, moved, store.get(settings, HOT, alone))
            store.put(
                settings, HOT, keys_key_for(moved), store.get(settings, HOT, keys_key_for(other))
            )

        result = strata_rebuild(node)

        with MinioServer(node.data_dir / "minio") as server:
            rebuilt_instances = _rows(server.settings, catalog.INSTANCES)
            rebuilt_studies = _rows(server.settings, catalog.STUDIES)
            rebuilt_access = _rows(server.settings, catalog.ACCESS)
        yield Rebuilt(
            node,
            {path.stem: path.read_bytes() for path in paths},
            _phi(paths),
            instances,
            studies,
            rebuilt_instances,
            rebuilt_studies,
            rebuilt_access,
            result,
        )
    finally:
        node.stop()


def _pack_of_one(instances: list[dict[str, Any]]) -> str:
    """The key of a pack that holds one row (the second version, sent alone)."""
    counts: dict[str, int] = {}
    for row in instances:
        counts[row["object_key"]] = counts.get(row["object_key"], 0) + 1
    key = next(row["object_key"] for row in instances if row["version"] == 2)
    assert counts[key] == 1
    return key


def test_rebuilt_instances_equal_what_the_node_wrote(rebuilt: Rebuilt) -> None:
    # 9 instances, one of them in 3 versions; the re-sent copy is no row.
    assert sorted(row["version"] for row in rebuilt.instances) == [1] * 9 + [2, 3]
    actions = {row["storage_action"] for row in rebuilt.instances}
    assert actions == {"transcoded", "zstd", "as_received"}
    # Every column, versions and ingest times to the microsecond included.
    assert rebuilt.rebuilt_instances == rebuilt.instances


def test_rebuilt_studies_equal_what_the_node_wrote_and_reads_are_lost(rebuilt: Rebuilt) -> None:
    assert len(rebuilt.studies) == len({row["study_instance_uid"] for row in rebuilt.instances})
    assert rebuilt.rebuilt_studies == rebuilt.studies
    # Objects do not record who read them: the `access` table starts empty again.
    assert rebuilt.rebuilt_access == []


def test_objects_that_cannot_be_read_are_reported_by_key_only(rebuilt: Rebuilt) -> None:
    result = rebuilt.result
    assert result.returncode == 1, result.stderr  # completed, with failures
    alone = _pack_of_one(rebuilt.instances)
    moved_member = next(r["sha256"] for r in rebuilt.instances if r["object_key"] == alone)
    for where in (GARBAGE_KEY, f"{alone[:-32] + 'f' * 32}#{moved_member}"):
        assert f"not rebuilt {HOT}/{where}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    summary = " ".join(result.stdout.split())
    packs = len({row["object_key"] for row in rebuilt.instances}) + 2
    assert f"│ {packs} │ {len(rebuilt.instances)} │ {len(rebuilt.studies)} │ 2 │" in summary
    for value in rebuilt.phi:
        assert value not in result.stdout + result.stderr


def test_a_catalog_with_rows_is_refused_unless_forced(
    rebuilt: Rebuilt, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command in this process, to spare an interpreter start; the fixture ran it as one.
    monkeypatch.setenv("STRATA_KEY_FILE", str(rebuilt.node.key_file))
    command = ["catalog", "rebuild", "--data-dir", str(rebuilt.node.data_dir)]
    assert cli.main(command) == 1
    message = " ".join(capsys.readouterr().err.split())
    assert f"catalog bucket '{CATALOG}' already holds" in message
    assert "--force" in message

    assert cli.main([*command, "--force"]) == 1  # the same two objects fail again
    assert "not rebuilt" in capsys.readouterr().err
    with MinioServer(rebuilt.node.data_dir / "minio") as server:
        assert _rows(server.settings, catalog.INSTANCES) == rebuilt.instances


def test_the_writer_index_left_by_the_rebuild_is_current(rebuilt: Rebuilt) -> None:
    """A node started next opens this index as it is (no rebuild) and looks up from it."""
    a_000 = pydicom.dcmread(io.BytesIO(rebuilt.files["a-000"])).SOPInstanceUID
    path = rebuilt.node.data_dir / "catalog-index" / f"{CATALOG}.sqlite"
    with MinioServer(rebuilt.node.data_dir / "minio") as server:
        options = catalog.storage_options(server.settings)
        tables = {
            name: DeltaTable(catalog.table_uri(CATALOG, name), storage_options=options)
            for name in SOURCES
        }
        index = CatalogIndex(sqlite3.connect(path))
        try:
            assert index.catch_up(tables, options) == "up to date"
            newest = index.by_sop(a_000)
            assert newest is not None and newest.version == 3
            assert newest.sha256 == hashlib.sha256(rebuilt.files["a-000-v3"]).hexdigest()
            first = index.by_sop(a_000, 1)
            assert first is not None
            assert first.sha256 == hashlib.sha256(rebuilt.files["a-000"]).hexdigest()
        finally:
            index.close()
