"""`strata tier apply` on a real node (Ray movers, real MinIO with a second parity for the
cold tier, the node's catalog writer): exactly the planned studies move, byte for byte,
held studies stay, and an apply killed mid-way finishes when run again with nothing lost,
nothing orphaned and no study in two tiers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from cluster import catalog
from cluster.client import StrataClient
from cluster.ops.node import NODE_FILE
from cluster.tiering.apply import MARKERS
from tests.integration.conftest import ct_instances
from tests.integration.node import TEST_TOKEN, Node, free_port
from workers.objects.envelope import KEYS_SUFFIX
from workers.records import StoreSettings

POLICY = """
[tiers.hot]
price_per_gb_month = 0.02
[tiers.warm]
price_per_gb_month = 0.01
[tiers.cold]
price_per_gb_month = 0.004
storage_class = "REDUCED_REDUNDANCY"

[[rules]]
name = "CT to cold after a year"
from = ["hot", "warm"]
to = "cold"
min_age_days = 365
modality = "CT"

[holds]
studies = [{held}]
"""


def study_files(count: int, tag: str, study_date: str) -> list[tuple[str, bytes]]:
    out = []
    for name, data in ct_instances(count, tag):
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.StudyDate = study_date
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        out.append((name, buffer.getvalue()))
    return out


def ingest(node: Node, folder: Path, files: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """Send ``files``; their data sets by SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files:
        (folder / f"{name}.dcm").write_bytes(data)
        paths.append(folder / f"{name}.dcm")
    with StrataClient(node.address, TEST_TOKEN) as client:
        outcomes = list(client.ingest_files(paths))
    assert {o.status for o in outcomes} == {"stored"}, outcomes
    return {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID: d for _, d in files}


def study_of(files: list[tuple[str, bytes]]) -> str:
    return str(pydicom.dcmread(io.BytesIO(files[0][1])).StudyInstanceUID)


def apply(node: Node, policy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "cluster.cli", "tier", "apply"),
            *("--policy", str(policy), "--server", node.address),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "STRATA_TOKEN": TEST_TOKEN},
        timeout=600,
        check=False,
    )


def apply_killed_when_listed(
    node: Node, policy: Path, prefix: str, poll_s: float = 0.005
) -> subprocess.CompletedProcess[str]:
    """Run an apply and SIGKILL the node's front end as soon as an object under ``prefix``
    (a marker) appears in the catalog bucket; wait until the supervisor has the node
    serving again. Returns the interrupted apply's result."""
    store = node.object_store()
    killed = threading.Event()

    def kill_when_listed() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if list(store.list_objects("strata-catalog", prefix=prefix, recursive=True)):
                os.kill(node.front_end_pid, 9)  # the supervisor starts the node again
                killed.set()
                return
            time.sleep(poll_s)

    watcher = threading.Thread(target=kill_when_listed)
    watcher.start()
    first = apply(node, policy)
    watcher.join()
    assert killed.is_set(), first.stdout + first.stderr
    deadline = time.monotonic() + 180
    while not node.healthy():
        assert time.monotonic() < deadline, node.log_tail()
        time.sleep(0.5)
    return first


SUMMARY = ("planned", "moved", "deleted", "failed", "GB", "resumed")


def summary(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The numbers row of the apply's summary table (columns as in ``SUMMARY``)."""
    rows = [
        " ".join(line.replace("│", " ").replace("┃", " ").split())
        for line in result.stdout.splitlines()
    ]
    assert any(row.split() == list(SUMMARY) for row in rows), result.stdout
    numbers = [row for row in rows if row and row.split()[0].isdigit()]
    return numbers[-1].split()


def tiers_by_study(node: Node, study: str) -> set[str]:
    with StrataClient(node.address, TEST_TOKEN) as client:
        return {instance.tier for instance in client.find_instances(study_instance_uid=study)}


def packs(node: Node, bucket: str) -> set[str]:
    store = node.object_store()
    if not store.bucket_exists(bucket):
        return set()
    return {
        item.object_name
        for item in store.list_objects(bucket, recursive=True)
        if not item.object_name.endswith(KEYS_SUFFIX)
    }


def placed_in_cold(node: Node) -> dict[str, str]:
    """The packs the catalog now places in the cold tier, and their studies (from the
    latest placement of each instance, the journal not yet flushed included)."""
    settings = StoreSettings(**json.loads((node.data_dir / NODE_FILE).read_text())["store"])
    rows = (
        catalog.connect(settings, "strata-catalog", ("placements",))
        .execute(
            "SELECT object_key, study FROM (SELECT arg_max(tier, placed_time) AS tier, "
            "arg_max(object_key, placed_time) AS object_key, any_value(study_instance_uid) "
            "AS study FROM placements GROUP BY sha256) WHERE tier = 'cold'"
        )
        .fetchall()
    )
    return dict(rows)


def assert_byte_exact(node: Node, sent: dict[str, bytes]) -> None:
    with StrataClient(node.address, TEST_TOKEN) as client:
        for uid, data in sent.items():
            assert client.retrieve(uid).data == data


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with Node(tmp_path_factory.mktemp("tiering"), dimse_port=str(free_port())) as running:
        yield running


def test_apply_moves_exactly_the_planned_studies_byte_for_byte(node: Node, tmp_path: Path) -> None:
    today = datetime.now(UTC).strftime("%Y%m%d")
    old = study_files(3, "old", "20180301")
    recent = study_files(2, "recent", today)
    held = study_files(2, "held", "20170101")
    sent = {}
    for name, files in (("old", old), ("recent", recent), ("held", held)):
        sent.update(ingest(node, tmp_path / name, files))
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(held=f'"{study_of(held)}"'))

    done = apply(node, policy)
    assert done.returncode == 0, done.stdout + done.stderr
    planned, moved, deleted, failed = summary(done)[:4]
    assert (planned, moved, deleted, failed) == ("1", "1", "0", "0")
    assert tiers_by_study(node, study_of(old)) == {"cold"}
    assert tiers_by_study(node, study_of(recent)) == {"hot"}
    assert tiers_by_study(node, study_of(held)) == {"hot"}
    # The old study's packs are in the cold bucket only, stored with the cold tier's
    # parity (MinIO's REDUCED_REDUNDANCY class, EC:1), and nothing else went there.
    cold = packs(node, "strata-cold")
    assert cold and not cold & packs(node, "strata-hot")
    store = node.object_store()
    for key in cold:
        stat = store.stat_object("strata-cold", key)
        assert (stat.metadata or {}).get("x-amz-storage-class") == "REDUCED_REDUNDANCY"
    assert_byte_exact(node, sent)
    # Run again: nothing left to move.
    again = apply(node, policy)
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary(again)[:2] == ["0", "0"]
    assert "Traceback" not in node.log_text()


def test_an_apply_killed_mid_way_finishes_when_run_again(node: Node, tmp_path: Path) -> None:
    studies = [study_files(2, f"s{number}", "20160101") for number in range(6)]
    sent = {}
    for number, files in enumerate(studies):
        sent.update(ingest(node, tmp_path / f"s{number}", files))
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(held=""))  # the study held before is not now
    cold_before = packs(node, "strata-cold")  # the study the test before moved
    first = apply_killed_when_listed(node, policy, MARKERS, poll_s=0.01)
    assert first.returncode != 0  # the node went away under it
    second = apply(node, policy)
    assert second.returncode == 0, second.stdout + second.stderr
    assert int(summary(second)[SUMMARY.index("resumed")]) >= 1  # the moves the kill cut off
    store = node.object_store()  # the restarted node's MinIO listens elsewhere
    for files in studies:
        assert tiers_by_study(node, study_of(files)) == {"cold"}  # never in two tiers
    assert not list(store.list_objects("strata-catalog", prefix=MARKERS, recursive=True))
    # No pack left behind in either tier: every cold pack is one a row names, and no
    # moved study's pack is still hot.
    placed = placed_in_cold(node)
    assert packs(node, "strata-cold") == set(placed)  # each cold pack is one a row names
    moved = {key for key, study in placed.items() if study in {study_of(f) for f in studies}}
    assert moved and not moved & packs(node, "strata-hot")
    assert cold_before <= set(placed)
    assert_byte_exact(node, sent)


def test_the_analytics_view_holds_no_direct_identifier(node: Node, tmp_path: Path) -> None:
    files = study_files(2, "analytics", "19991231")
    for number, (name, data) in enumerate(files):
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.PatientName = "Zwicky^Quentinella"
        dataset.PatientID = f"PID-{number}-81723"
        dataset.AccessionNumber = "ACC-55519"
        dataset.PatientBirthDate = "19470312"
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files[number] = (name, buffer.getvalue())
    ingest(node, tmp_path / "in", files)
    shown = subprocess.run(
        [
            *(sys.executable, "-m", "cluster.cli", "query", "--data-dir", str(node.data_dir)),
            "SELECT * FROM analytics WHERE study_year = 1999",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "STRATA_KEY_FILE": str(node.key_file), "COLUMNS": "4000"},
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout + shown.stderr
    headers = [pydicom.dcmread(io.BytesIO(data)) for _, data in files]
    identifiers = {"Zwicky", "Quentinella", "ACC-55519", "19470312", "1947-03-12"}
    for header in headers:
        identifiers |= {header.PatientID, header.StudyInstanceUID, header.SOPInstanceUID}
        identifiers |= {header.SeriesInstanceUID}
    assert not [value for value in identifiers if value in text]
    assert text.count("1999") >= 2 and "CT" in text  # the two instances, by year only
    assert "patient_key" in text and "study_key" in text


PROMOTING = """
[[rules]]
name = "promote on read"
from = ["warm", "cold"]
to = "hot"
read_within_days = 7

[[rules]]
name = "cold when old and unread"
from = ["hot", "warm"]
to = "cold"
min_age_days = 365
unread_days = 7
"""


def test_a_read_of_a_cold_study_promotes_it_per_policy(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("promote")
    policy = root / "policy.toml"
    policy.write_text(PROMOTING)
    with Node(root, tier_policy=str(policy)) as promoting:
        files = study_files(2, "cold", "20150505")
        sent = ingest(promoting, root / "in", files)
        study = study_of(files)
        # Planned as of a month from now: unread for 30 days by then, so it goes cold.
        later = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
        moved = subprocess.run(
            [
                *(sys.executable, "-m", "cluster.cli", "tier", "apply"),
                *("--policy", str(policy), "--server", promoting.address, "--at", later),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "STRATA_TOKEN": TEST_TOKEN},
            timeout=300,
            check=False,
        )
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert tiers_by_study(promoting, study) == {"cold"}
        with StrataClient(promoting.address, TEST_TOKEN) as client:
            uid, data = next(iter(sent.items()))
            assert client.retrieve(uid).data == data  # a read, from the cold tier
        deadline = time.monotonic() + 90
        while tiers_by_study(promoting, study) != {"hot"}:
            assert time.monotonic() < deadline, promoting.log_tail()
            time.sleep(0.5)
        assert_byte_exact(promoting, sent)
        assert not packs(promoting, "strata-cold")  # the cold copies went with the move
        assert tiers_by_study(promoting, study) == {"hot"}  # reads keep it there


SOURCE_POLICY = """
[[rules]]
name = "the old PACS's studies to warm"
from = "hot"
to = "warm"
source = "dimse:OLD_PACS"
"""


def test_a_rule_on_the_source_moves_only_what_came_through_it(node: Node, tmp_path: Path) -> None:
    """The catalog keeps each instance's door (and DIMSE's calling AE) and the equipment's
    manufacturer and model: a rule on the source moves only that sender's study, and the
    analytics view shows the equipment."""
    from tests.integration.conftest import dcmtk

    legacy = study_files(2, "legacy", "20240101")
    for number, (name, data) in enumerate(legacy):
        dataset = pydicom.dcmread(io.BytesIO(data))
        dataset.Manufacturer = "ACME Imaging"
        dataset.ManufacturerModelName = f"Scanner {number}"
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        legacy[number] = (name, buffer.getvalue())
    folder = tmp_path / "legacy"
    folder.mkdir()
    for name, data in legacy:
        (folder / f"{name}.dcm").write_bytes(data)
    sent = dcmtk(
        "storescu",
        "-aet",
        "OLD_PACS",
        "-aec",
        "STRATA",
        "+sd",
        "127.0.0.1",
        str(node.dimse_port),
        str(folder),
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    modern = study_files(2, "modern", "20240101")
    ingest(node, tmp_path / "modern", modern)
    policy = tmp_path / "policy.toml"
    policy.write_text(SOURCE_POLICY)

    done = apply(node, policy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary(done)[:2] == ["1", "1"]
    assert tiers_by_study(node, study_of(legacy)) == {"warm"}
    assert tiers_by_study(node, study_of(modern)) == {"hot"}
    shown = subprocess.run(
        [
            *(sys.executable, "-m", "cluster.cli", "query", "--data-dir", str(node.data_dir)),
            "SELECT manufacturer, model, source, tier FROM analytics "
            "WHERE manufacturer = 'ACME Imaging' ORDER BY model",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "STRATA_KEY_FILE": str(node.key_file), "COLUMNS": "4000"},
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    rows = [" ".join(line.replace("│", " ").split()) for line in shown.stdout.splitlines()]
    assert "ACME Imaging Scanner 0 dimse:OLD_PACS warm" in rows, shown.stdout
    assert "ACME Imaging Scanner 1 dimse:OLD_PACS warm" in rows, shown.stdout
