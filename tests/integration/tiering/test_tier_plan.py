"""`strata tier plan` over a real catalog (the real writer, Delta tables in real MinIO):
each study's state is read as the policy needs it, the right studies are planned, the
costs are printed, and nothing is changed."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

from cluster.catalog import CatalogWriter, Placement
from cluster.ops.minio import MinioServer
from cluster.tiering.states import study_states
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

    async def write() -> None:
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
        await writer.close()

    asyncio.run(write())
    states = {state.study_instance_uid: state for state in study_states(settings, bucket_name)}
    assert set(states) == {old, recent, held, moved}
    assert states[old].instances == 2 and states[old].bytes_stored == 500 + 1500
    assert states[old].body_parts == ("CHEST",) and states[old].modalities == ("CT",)
    assert states[old].last_access_time is None
    assert states[moved].tier == "cold"
    assert states[moved].tier_since == datetime(2025, 1, 1, tzinfo=UTC)
    assert states[moved].last_access_time is not None

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    before = sorted(store.list_keys(settings, bucket_name, ""))
    environment = {
        **os.environ,
        "STRATA_MINIO_ENDPOINT": settings.endpoint,
        "STRATA_MINIO_ACCESS_KEY": settings.access_key,
        "STRATA_MINIO_SECRET_KEY": settings.secret_key,
        "STRATA_CATALOG_BUCKET": bucket_name,
    }
    shown = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "tier", "plan", "--policy", str(policy)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    lines = [" ".join(line.replace("│", " ").split()) for line in shown.stdout.splitlines()]
    assert "tier plan: 4 studies considered, nothing changed" in lines
    # The old CT goes cold; the held one does not; the recent one stays; 7.4 comes back.
    assert "hot cold 1 2 0.000" in lines
    assert "cold hot 1 1 0.000" in lines
    assert sum(1 for line in lines if line.startswith(("hot ", "warm ", "cold "))) >= 2
    assert not any(line.startswith(("hot warm", "hot deleted")) for line in lines)
    assert any(line.startswith("total") for line in lines)
    assert sorted(store.list_keys(settings, bucket_name, "")) == before  # nothing changed

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

    broken = tmp_path / "broken.toml"
    broken.write_text(POLICY.replace('to = "cold"', 'to = "freezer"'))
    refused = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "tier", "plan", "--policy", str(broken)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0
    assert "rule 2 ('cold after a year') to must name a tier" in refused.stderr + refused.stdout
