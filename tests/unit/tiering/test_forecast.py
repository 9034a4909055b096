"""The forecast on cases worked out by hand (the model is in cluster/tiering/forecast.py)."""

from __future__ import annotations

import csv
import dataclasses
import tomllib
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from cluster.tiering import forecast
from cluster.tiering.forecast import Cohort, Measured
from cluster.tiering.policy import parse_policy

NOW = date(2027, 1, 1)
TB = forecast.TB


def policy(extra: str = "", cold_class: str = "STANDARD") -> forecast.Policy:
    return parse_policy(
        tomllib.loads(
            f"""
            [tiers.hot]
            price_per_gb_month = 0.02
            [tiers.warm]
            price_per_gb_month = 0.01
            [tiers.cold]
            price_per_gb_month = 0.004
            storage_class = "{cold_class}"
            [[rules]]
            name = "cold after a year"
            from = "hot"
            to = "cold"
            min_age_days = 365
            {extra}
            """
        )
    )


def measured(*cohorts: Cohort) -> Measured:
    return Measured(
        cohorts=cohorts,
        annual_raw_bytes=10 * TB,
        modality_share={"CT": 1.0},
        ratio={"CT": 0.5},
        read_share={"CT": 0.0},
        read_after_days={},
    )


def test_two_years_at_20_percent_by_hand() -> None:
    rows = forecast.project(measured(), policy(), [0.2], 2, now=NOW)
    first, second = rows
    # Year 1: one cohort, 10 × 1.2 = 12 TB raw, 6 TB stored, half a year old: hot.
    assert first.stored_tb == pytest.approx({"hot": 6.0, "warm": 0.0, "cold": 0.0})
    assert first.raw_tb == pytest.approx(12.0)
    assert (first.drives, first.nodes) == (1, 1)  # 6 TB × 4/2 (EC:2 of 4) = 12 TB: 1 drive
    assert first.cost == pytest.approx(6 * 1000 * 0.02)
    # Year 2: that cohort is 1.5 years old (cold); a new one of 14.4 TB raw, 7.2 stored.
    assert second.stored_tb == pytest.approx({"hot": 7.2, "warm": 0.0, "cold": 6.0})
    assert second.raw_tb == pytest.approx(26.4)
    assert second.drives == 2  # hot 14.4 TB of drive: 1; cold 12 TB: 1
    assert second.monthly_cost == pytest.approx({"hot": 144.0, "warm": 0.0, "cold": 24.0})
    assert second.all_hot_cost == pytest.approx(13.2 * 1000 * 0.02)


def test_what_is_stored_now_ages_with_the_rest_and_parity_follows_the_storage_class() -> None:
    old = Cohort("CT", date(2020, 7, 1), 2 * TB, 1 * TB)
    [row] = forecast.project(
        measured(old), policy(cold_class="REDUCED_REDUNDANCY"), [0.2], 1, now=NOW
    )
    assert row.stored_tb["cold"] == pytest.approx(1.0)
    assert row.raw_tb == pytest.approx(14.0)
    # Hot 6 TB × 2 = 12 TB: 1 drive; cold 1 TB × 4/3: 1 drive (EC:1 of 4).
    assert row.drives == 2
    [big] = forecast.project(
        measured(old), policy(), [0.2], 1, now=NOW, annual_raw_bytes=100 * TB, drive_tb=10
    )
    # Hot: 100 × 1.2 × 0.5 = 60 TB stored, 120 TB of drives: 12; cold 2 TB: 1.
    assert (big.drives, big.nodes) == (13, 4)


def test_retention_ends_take_cohorts_out() -> None:
    retained = policy('[[retention]]\nname = "short"\nkeep_days = 500')
    _, second = forecast.project(measured(), retained, [0.2], 2, now=NOW)
    assert second.stored_tb == pytest.approx({"hot": 7.2, "warm": 0.0, "cold": 0.0})


def test_read_studies_follow_their_own_path() -> None:
    unread = policy(
        '[[rules]]\nname = "warm when unread"\nfrom = "hot"\nto = "warm"\nunread_days = 150'
    )
    assert forecast.tier_at(unread, "CT", 182, None) == "warm"  # unread 150 days at day 150
    assert forecast.tier_at(unread, "CT", 182, 50.0) == "hot"  # read at day 50: until 200
    assert forecast.tier_at(unread, "CT", 400, 50.0) == "warm"  # the cold rule is from hot
    half = Measured((), 10 * TB, {"CT": 1.0}, {"CT": 1.0}, {"CT": 0.5}, {"CT": 50.0})
    [row] = forecast.project(half, unread, [0.0], 1, now=NOW)
    # The year's cohort is half a year old: the half never read is warm, the half read
    # at day 50 still hot.
    assert row.stored_tb == pytest.approx({"hot": 5.0, "warm": 5.0, "cold": 0.0})


def test_a_tiers_own_codec_shrinks_its_bytes_by_the_measured_ratio() -> None:
    """Cold in JPEG 2000 measured at 0.9 of the HTJ2K bytes: the never-read half of a
    cohort, cold after 150 days, takes 0.9 of 5 TB; without a codec, no saving."""
    text = '[[rules]]\nname = "cold when unread"\nfrom = "hot"\nto = "cold"\nunread_days = 150'
    half = Measured((), 10 * TB, {"CT": 1.0}, {"CT": 1.0}, {"CT": 0.5}, {"CT": 50.0}, {"cold": 0.9})
    plain_policy = policy(text)
    tiers = dict(plain_policy.tiers)
    tiers["cold"] = dataclasses.replace(tiers["cold"], codec="jpeg2000")
    coded = dataclasses.replace(plain_policy, tiers=tiers)
    [row] = forecast.project(half, coded, [0.0], 1, now=NOW)
    assert row.stored_tb == pytest.approx({"hot": 5.0, "warm": 0.0, "cold": 4.5})
    [plain] = forecast.project(half, plain_policy, [0.0], 1, now=NOW)
    assert plain.stored_tb["cold"] == pytest.approx(5.0)


def test_the_catalog_is_summarized_into_rates_ratios_and_reads() -> None:
    now = datetime(2027, 1, 1, tzinfo=UTC)
    rows = [
        ("CT", date(2026, 6, 30), datetime(2026, 7, 1, tzinfo=UTC), 1e12, 0.5e12, 3.0),
        ("MR", date(2015, 1, 1), datetime(2025, 1, 1, tzinfo=UTC), 2e12, 1e12, None),
    ]
    summary = forecast.summarize(rows, now)
    assert summary.annual_raw_bytes == pytest.approx(1e12)  # the last 365 days: the CT
    assert summary.modality_share == {"CT": 1.0}
    assert summary.ratio == {"CT": 0.5, "MR": 0.5}
    assert summary.read_share == {"CT": 1.0, "MR": 0.0}
    assert summary.read_after_days == {"CT": 3.0}
    assert [(c.modality, c.born.year) for c in summary.cohorts] == [("CT", 2026), ("MR", 2015)]
    young = forecast.summarize(rows[:1], now)  # a catalog 184 days old: scaled to a year
    assert young.annual_raw_bytes == pytest.approx(1e12 * 365 / 184)


def test_csv_and_plot_are_written(tmp_path: Path) -> None:
    rows = forecast.project(measured(), policy(), [0.2, 0.25], 3, now=NOW)
    forecast.write_csv(rows, tmp_path / "f.csv")
    forecast.plot(rows, tmp_path / "f.png")
    with (tmp_path / "f.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and table[0]["hot_tb"] == "6.0000"
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
