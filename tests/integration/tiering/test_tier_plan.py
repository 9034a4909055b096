"""The tier plan over a real catalog (the real writer and its index, Delta tables in real
MinIO): each study's state is read as the policy needs it, the right studies are
planned, the costs are summed, nothing is changed, and a plan looks only at the studies
that are due; `strata tier plan` asks a running node; the forecast reads the catalog."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import tomllib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from cluster.catalog import CatalogWriter, Placement
from cluster.ops.minio import MinioServer
from cluster.tiering.engine import Plan
from cluster.tiering.policy import parse_policy
from tests.integration.conftest import make_record, stored
from workers.objects import store

POLICY = """
[tiers.hot]
price_per_gb_month = 0.02
[tiers.warm]
price_per_gb_month = 0.01
[tiers.cold]
price_per_gb_month = 0.004

[[rules]]
name = "promote on read"
from = ["warm", "cold"]
to = "hot"
read_within_days = 7

[[rules]]
name = "cold after a year"
from = ["hot", "warm"]
to = "cold"
min_age_days = 365
modality = ["CT"]

[holds]
studies = ["7.3"]
"""

# As of this day (the commits below are "now", so reads are within 7 days of it only
# when it is close to today).
AT = datetime.now(UTC)


def test_the_plan_reads_each_study_as_the_policy_needs_and_changes_nothing(
    minio: MinioServer, bucket_name: str, tmp_path: Path
) -> None:
    settings = minio.settings
    old, recent, held, moved = "7.1", "7.2", "7.3", "7.4"
    records = [
        make_record("7.1.1", study_uid=old, study_date=date(2020, 1, 1)),
        make_record("7.1.2", study_uid=old, study_date=date(2020, 1, 1), bytes_in=3000),
        make_record("7.2.1", study_uid=recent, study_date=AT.date()),
        make_record("7.3.1", study_uid=held, study_date=date(2019, 5, 5)),
        make_record("7.4.1", study_uid=moved, study_date=date(2018, 2, 2), modality="MR"),
    ]
    policy = parse_policy(tomllib.loads(POLICY), "policy.toml")

    async def write_and_plan() -> list[Plan]:
        index = str(tmp_path / "i")
        writer = CatalogWriter(settings, bucket_name, max_wait_s=0.0, index_path=index)
        await writer.commit([stored(record) for record in records])
        # Study 7.4 was moved to cold earlier, and has been read since: promoted.
        last = records[-1]
        await writer.place(
            [
                Placement(
                    last.sha256,
                    last.sop_instance_uid,
                    1,
                    moved,
                    "cold",
                    "strata-cold",
                    last.object_key,
                    0,
                    last.bytes_stored,
                    last.key_id,
                    "tier move",
                    datetime(2025, 1, 1, tzinfo=UTC),
                )
            ]
        )
        await writer.record_access([moved])
        await writer.flush_now(raise_errors=True)
        before = sorted(store.list_keys(settings, bucket_name, ""))
        plans = [await writer.plan_tiering(policy, totals=True)]  # a policy new to it
        plans.append(await writer.plan_tiering(policy))  # right after: only the decided
        assert sorted(store.list_keys(settings, bucket_name, "")) == before  # nothing changed
        await writer.record_access([recent])  # a read makes a study due again
        plans.append(await writer.plan_tiering(policy))
        # As of 400 days on (changing nothing), the recent CT is a year old: it goes cold.
        plans.append(await writer.plan_tiering(policy, AT + timedelta(days=400)))
        # Another policy: every study is looked at again.
        other = parse_policy(tomllib.loads(POLICY.replace("365", "366")), "other.toml")
        plans.append(await writer.plan_tiering(other))
        await writer.close()
        return plans

    first, second, after_read, later, other = asyncio.run(write_and_plan())
    decided = {d.study.study_instance_uid: d for d in first.decisions}
    assert first.considered == 4
    # The old CT goes cold; the held one does not; the recent one stays; 7.4 comes back.
    assert {uid: (d.study.tier, d.to) for uid, d in decided.items()} == {
        old: ("hot", "cold"),
        moved: ("cold", "hot"),
    }
    # Each study's state as the policy reads it: sizes, parts, modalities, its tier's
    # start (the placement) and its last read.
    state = decided[old].study
    assert state.instances == 2 and state.bytes_stored == 500 + 1500
    assert state.body_parts == ("CHEST",) and state.modalities == ("CT",)
    assert state.last_access_time is None
    promoted = decided[moved].study
    assert promoted.tier_since == datetime(2025, 1, 1, tzinfo=UTC)
    assert promoted.last_access_time is not None
    assert first.stored_before == {"hot": 2000 + 500 + 500, "cold": 500}
    assert first.stored_after == {"hot": 500 + 500 + 500, "cold": 2000}
    # Incremental: the next plan looks only at the studies it decided (not carried out),
    # then also at the one read meanwhile; a plan as of later sees the recent CT's day.
    assert second.considered == 2
    assert after_read.considered == 3
    assert {d.study.study_instance_uid for d in later.decisions} >= {recent}
    assert other.considered == 4


def test_strata_tier_plan_asks_the_node(tmp_path: Path) -> None:
    """The CLI's plan comes from a running node (its index), and a broken policy is
    refused naming the rule and the field."""
    from tests.integration.node import TEST_TOKEN, Node

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    broken = tmp_path / "broken.toml"
    broken.write_text(POLICY.replace('to = "cold"', 'to = "freezer"'))
    environment = {**os.environ, "STRATA_TOKEN": TEST_TOKEN}
    (tmp_path / "node").mkdir()
    with Node(tmp_path / "node") as node:
        shown = subprocess.run(
            [
                *(sys.executable, "-m", "cluster.cli", "tier", "plan"),
                *("--policy", str(policy), "--server", node.address),
            ],
            capture_output=True,
            text=True,
            env=environment,
            timeout=120,
            check=False,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "the policy moves no study now" in shown.stdout  # an empty archive
        lines = [" ".join(line.replace("│", " ").split()) for line in shown.stdout.splitlines()]
        assert "total 0.00 0.00" in lines, shown.stdout
        refused = subprocess.run(
            [
                *(sys.executable, "-m", "cluster.cli", "tier", "plan"),
                *("--policy", str(broken), "--server", node.address),
            ],
            capture_output=True,
            text=True,
            env=environment,
            timeout=120,
            check=False,
        )
    assert refused.returncode != 0
    assert "rule 2 ('cold after a year') to must name a tier" in refused.stderr + refused.stdout


def test_the_forecast_reads_the_catalog(
    minio: MinioServer, bucket_name: str, tmp_path: Path
) -> None:
    settings = minio.settings
    records = [
        make_record("8.1.1", study_uid="8.1", study_date=date(2020, 1, 1)),
        make_record("8.2.1", study_uid="8.2", study_date=AT.date()),
    ]

    async def write() -> None:
        writer = CatalogWriter(
            settings, bucket_name, max_wait_s=0.0, index_path=str(tmp_path / "i")
        )
        await writer.commit([stored(record) for record in records])
        await writer.flush_now(raise_errors=True)
        await writer.close()

    asyncio.run(write())
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    environment = {
        **os.environ,
        "STRATA_MINIO_ENDPOINT": settings.endpoint,
        "STRATA_MINIO_ACCESS_KEY": settings.access_key,
        "STRATA_MINIO_SECRET_KEY": settings.secret_key,
        "STRATA_CATALOG_BUCKET": bucket_name,
    }
    # The forecast reads the same catalog: two years at 20 %, 1 raw TB a year now.
    projected = subprocess.run(
        [
            *(sys.executable, "-m", "cluster.cli", "forecast", "--policy", str(policy)),
            *("--years", "2", "--growth", "0.2", "--annual-tb", "1"),
            *("--csv", str(tmp_path / "f.csv"), "--png", str(tmp_path / "f.png")),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert projected.returncode == 0, projected.stderr
    with (tmp_path / "f.csv").open() as handle:
        years = list(csv.DictReader(handle))
    assert [row["year"] for row in years] == ["1", "2"]
    # Year 1's cohort is hot (half a year old); by year 2 its CT share is cold; every
    # stored byte is half its raw bytes (the records' ratio).
    assert float(years[0]["hot_tb"]) > 0 and float(years[1]["cold_tb"]) > 0
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
