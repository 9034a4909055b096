"""Capacity and cost, year by year, as the archive grows: the catalog's volume and the
policy's tiers projected forward.

The model (every assumption here is printed with the forecast, in docs, and tested):

- **Cohorts.** Studies are grouped by modality and by the year they were born (study
  date, or first ingest). What the catalog holds now is the first set of cohorts; each
  future year adds one cohort per modality, born mid-year, of ``annual × (1 + g)^y`` raw
  bytes for year ``y`` (1 = the coming year), split between modalities as the last 365
  days of ingest were. ``annual`` is the raw bytes ingested in the last 365 days, or, when
  the catalog is younger than that, its whole ingest scaled to a year; ``--annual-tb``
  replaces it (a migration's backlog is not a growth rate).
- **Compression.** Each modality keeps its measured ratio of stored to raw bytes.
- **Where a cohort is.** The policy (its move rules and retention) is applied to a typical
  study of the cohort's modality every 30 days of its life, starting hot, as the engine
  decides for real studies: a study of a modality that is read keeps the median days
  from ingest to its last read seen in the catalog; the share of studies never read is
  measured too, and each cohort is split between the two paths. Holds are per study and
  not forecast.
- **A tier's own codec.** A tier with a ``codec`` holds its bytes times the ratio measured
  on the instances already re-encoded into it (their placements' byte ranges against
  their sizes at ingest); none yet: no saving assumed.
- **Hardware.** Each tier's bytes take ``drives / (drives − parity)`` times their size on
  drives of ``drive_tb``, parity per the tier's storage class (STANDARD: EC:2 of 4,
  REDUCED_REDUNDANCY: EC:1 of 4), rounded up to whole drives, ``drives_per_node`` to a node.
- **Cost.** Each tier's stored TB × 1,000 × its price per GB-month; and the cost of the
  same bytes all kept hot.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from cluster.catalog import queries
from cluster.catalog.schema import ACCESS, DEFAULT_BUCKET, INSTANCES, PLACEMENTS, STUDIES
from cluster.config import TIERS
from cluster.tiering.engine import StudyState, decide
from cluster.tiering.policy import Policy
from workers.records import StoreSettings

TB = 1e12
STEP_DAYS = 30
# Data and parity drives of MinIO's erasure sets here (4 drives): per storage class.
ERASURE = {"STANDARD": (4, 2), "REDUCED_REDUNDANCY": (4, 1)}


@dataclass(frozen=True)
class Cohort:
    """The studies of one modality born in one year, and what they take."""

    modality: str
    born: date
    raw_bytes: float
    stored_bytes: float


@dataclass(frozen=True)
class Measured:
    """What the catalog says about the archive, for the forecast."""

    cohorts: tuple[Cohort, ...]  # what is stored now
    annual_raw_bytes: float  # raw bytes a year, at the current rate
    modality_share: Mapping[str, float]  # of the annual ingest
    ratio: Mapping[str, float]  # stored / raw bytes, per modality
    read_share: Mapping[str, float]  # studies ever read, per modality
    read_after_days: Mapping[str, float]  # median days from ingest to the last read
    # Per tier: bytes after re-encoding with the tier's codec / bytes before (measured).
    recoded: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class YearRow:
    growth: float
    year: int
    stored_tb: Mapping[str, float]  # per tier
    raw_tb: float
    drives: int
    nodes: int
    monthly_cost: Mapping[str, float]  # per tier
    all_hot_cost: float

    @property
    def cost(self) -> float:
        return sum(self.monthly_cost.values())


def measure(
    settings: StoreSettings, bucket: str = DEFAULT_BUCKET, now: datetime | None = None
) -> Measured:
    """Volume, compression, ingest rate and reads, from the catalog (DuckDB over
    ``studies``, ``instances`` and ``access``), and what each tier's own codec saved on
    the instances already re-encoded into it (``placements``)."""
    moment = now or datetime.now(UTC)
    connection = queries.connect(settings, bucket, (STUDIES, ACCESS, INSTANCES))
    # Sizes as ingest stored them (in the hot tier's codec): a tier's own codec is applied
    # by the projection, once, whether or not a study has been re-encoded yet.
    rows = connection.execute(
        f"""
        WITH reads AS (
            SELECT study_instance_uid, max(access_time) AS last_read FROM {ACCESS} GROUP BY 1
        ), sizes AS (
            SELECT study_instance_uid, sum(bytes_in) AS bytes_in,
                   sum(bytes_stored) AS bytes_stored
            FROM {INSTANCES} GROUP BY 1
        )
        SELECT coalesce(s.modalities[1], '') AS modality,
               coalesce(s.study_date, CAST(s.first_ingest_time AS DATE)) AS born,
               s.first_ingest_time, z.bytes_in, z.bytes_stored,
               date_diff('second', s.first_ingest_time, r.last_read) / 86400.0 AS read_after
        FROM {STUDIES} s JOIN sizes z USING (study_instance_uid)
        LEFT JOIN reads r USING (study_instance_uid)
        WHERE s.tier <> 'deleted'
        """
    ).fetchall()
    measured = summarize(rows, moment)
    recoded = (
        queries.connect(settings, bucket, (PLACEMENTS, INSTANCES))
        .execute(
            f"""
        WITH latest AS (
            SELECT sha256, arg_max(tier, placed_time) AS tier,
                   arg_max(byte_length, placed_time) AS now_bytes,
                   arg_max(reason, placed_time) AS reason
            FROM {PLACEMENTS} GROUP BY 1
        )
        SELECT l.tier, sum(l.now_bytes), sum(i.bytes_stored)
        FROM latest l JOIN {INSTANCES} i USING (sha256)
        WHERE l.reason LIKE '%re-encoded%' GROUP BY 1
        """
        )
        .fetchall()
    )
    ratios = {str(tier): float(now) / float(then) for tier, now, then in recoded if then}
    return replace(measured, recoded=ratios)


def summarize(rows: Iterable[tuple[object, ...]], now: datetime) -> Measured:
    """``measure`` from rows of (modality, born, first ingest, raw bytes, stored bytes,
    days from ingest to last read or None)."""
    cohorts: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    raw: dict[str, float] = defaultdict(float)
    stored: dict[str, float] = defaultdict(float)
    recent: dict[str, float] = defaultdict(float)
    studies: dict[str, int] = defaultdict(int)
    reads: dict[str, list[float]] = defaultdict(list)
    first_ingest = now
    year_ago = now - timedelta(days=365)
    for modality, born, ingested, bytes_in, bytes_stored, read_after in rows:
        name = str(modality or "")
        assert isinstance(born, date) and isinstance(ingested, datetime)
        moment = ingested if ingested.tzinfo else ingested.replace(tzinfo=UTC)
        size_in, size_stored = float(bytes_in), float(bytes_stored)  # type: ignore[arg-type]
        cohort = cohorts[name, born.year]
        cohort[0] += size_in
        cohort[1] += size_stored
        raw[name] += size_in
        stored[name] += size_stored
        studies[name] += 1
        first_ingest = min(first_ingest, moment)
        if moment >= year_ago:
            recent[name] += size_in
        if read_after is not None:
            reads[name].append(max(0.0, float(read_after)))  # type: ignore[arg-type]
    span_days = max((now - first_ingest).total_seconds() / 86_400, 1.0)
    annual = sum(recent.values()) * (365 / span_days if span_days < 365 else 1.0)
    total_recent = sum(recent.values()) or 1.0
    return Measured(
        cohorts=tuple(
            Cohort(modality, date(year, 7, 1), sizes[0], sizes[1])
            for (modality, year), sizes in sorted(cohorts.items())
        ),
        annual_raw_bytes=annual,
        modality_share={name: size / total_recent for name, size in recent.items()},
        ratio={name: stored[name] / raw[name] if raw[name] else 1.0 for name in raw},
        read_share={name: len(reads[name]) / studies[name] for name in studies},
        read_after_days={name: _median(days) for name, days in reads.items() if days},
    )


def tier_at(
    policy: Policy, modality: str, age_days: int, read_after_days: float | None
) -> str | None:
    """The tier a typical study of ``modality`` is in at ``age_days`` old (None: deleted
    at the end of its retention), walking the policy through its life every 30 days."""
    born = datetime(2000, 1, 1, tzinfo=UTC)
    tier, since = "hot", born
    last_read = None if read_after_days is None else born + timedelta(days=read_after_days)
    for day in range(0, age_days + 1, STEP_DAYS):
        now = born + timedelta(days=day)
        study = StudyState(
            "forecast",
            "",
            tier,
            born.date(),
            born,
            last_read if last_read is not None and last_read <= now else None,
            since,
            (modality,),
        )
        decision = decide(study, policy, now)
        if decision is None:
            continue
        if decision.action == "delete":
            return None
        tier, since = decision.to, now
    return tier


def project(
    measured: Measured,
    policy: Policy,
    growths: Sequence[float],
    years: int,
    *,
    now: date,
    annual_raw_bytes: float | None = None,
    drive_tb: float = 16.0,
    drives_per_node: int = 4,
) -> list[YearRow]:
    """The forecast, a row per growth rate and year (1 .. ``years``), each at year end."""
    annual = measured.annual_raw_bytes if annual_raw_bytes is None else annual_raw_bytes
    shares = dict(measured.modality_share) or {"": 1.0}
    paths: dict[tuple[str, int], dict[str, float]] = {}

    def placed(modality: str, age_days: int) -> dict[str, float]:
        """The share of a cohort in each tier at this age (the rest deleted)."""
        key = (modality, age_days // STEP_DAYS)
        if key not in paths:
            read = measured.read_share.get(modality, 0.0)
            after = measured.read_after_days.get(modality)
            shares_by_tier: dict[str, float] = defaultdict(float)
            for weight, read_after in ((read, after), (1.0 - read, None)):
                if weight <= 0:
                    continue
                tier = tier_at(policy, modality, age_days, read_after)
                if tier is not None:
                    shares_by_tier[tier] += weight
            paths[key] = dict(shares_by_tier)
        return paths[key]

    rows = []
    for growth in growths:
        for year in range(1, years + 1):
            end = now + timedelta(days=365 * year)
            cohorts = list(measured.cohorts) + [
                Cohort(
                    modality,
                    now + timedelta(days=round((born - 0.5) * 365)),  # mid-year
                    annual * (1 + growth) ** born * share,
                    annual * (1 + growth) ** born * share * measured.ratio.get(modality, 1.0),
                )
                for born in range(1, year + 1)
                for modality, share in shares.items()
            ]
            stored: dict[str, float] = defaultdict(float)
            raw = 0.0
            for cohort in cohorts:
                age = (end - cohort.born).days
                if age < 0:
                    continue
                for tier, share in placed(cohort.modality, age).items():
                    codec = measured.recoded.get(tier, 1.0) if policy.tiers[tier].codec else 1.0
                    stored[tier] += cohort.stored_bytes * share * codec
                    raw += cohort.raw_bytes * share
            stored_tb = {tier: stored.get(tier, 0.0) / TB for tier in TIERS}
            drives = 0
            for tier, size in stored_tb.items():
                total, parity = ERASURE[policy.tiers[tier].storage_class]
                drives += math.ceil(size * total / (total - parity) / drive_tb) if size else 0
            rows.append(
                YearRow(
                    growth,
                    year,
                    stored_tb,
                    raw / TB,
                    drives,
                    math.ceil(drives / drives_per_node) if drives else 0,
                    {
                        tier: size * 1000 * policy.tiers[tier].price_per_gb_month
                        for tier, size in stored_tb.items()
                    },
                    sum(stored_tb.values()) * 1000 * policy.tiers["hot"].price_per_gb_month,
                )
            )
    return rows


def write_csv(rows: Sequence[YearRow], path: Path) -> None:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(
            [
                "growth",
                "year",
                *(f"{tier}_tb" for tier in TIERS),
                "raw_tb",
                "drives",
                "nodes",
                *(f"{tier}_usd_month" for tier in TIERS),
                "usd_month",
                "all_hot_usd_month",
            ]
        )
        for row in rows:
            out.writerow(
                [
                    row.growth,
                    row.year,
                    *(f"{row.stored_tb[tier]:.4f}" for tier in TIERS),
                    f"{row.raw_tb:.4f}",
                    row.drives,
                    row.nodes,
                    *(f"{row.monthly_cost[tier]:.2f}" for tier in TIERS),
                    f"{row.cost:.2f}",
                    f"{row.all_hot_cost:.2f}",
                ]
            )


def plot(rows: Sequence[YearRow], path: Path) -> None:
    """Stored TB per tier (stacked) and monthly cost against all-hot, per growth rate."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    growths = sorted({row.growth for row in rows})
    figure, axes = plt.subplots(2, len(growths), figsize=(6 * len(growths), 8), squeeze=False)
    for column, growth in enumerate(growths):
        mine = [row for row in rows if row.growth == growth]
        years = [row.year for row in mine]
        axes[0][column].stackplot(
            years, *([row.stored_tb[tier] for row in mine] for tier in TIERS), labels=TIERS
        )
        axes[0][column].set_title(f"stored TB by tier, growth {growth:.0%} a year")
        axes[0][column].legend(loc="upper left")
        axes[1][column].plot(years, [row.cost for row in mine], label="tiered")
        axes[1][column].plot(years, [row.all_hot_cost for row in mine], label="all hot")
        axes[1][column].set_title("monthly cost (USD)")
        axes[1][column].set_xlabel("year")
        axes[1][column].legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
