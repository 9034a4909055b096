"""The tiering engine's plan: the policy applied to each study's state, and what it costs.

``decide`` is the whole policy for one study (pure: a study's state and the time in, one
decision out), so that the same decision is made by ``strata tier plan``, by the apply
that carries the plan out, and by the tests on hand-made cases. ``plan`` sums the
decisions into flows (from → to: studies, instances, bytes) and prices the tiers before
and after from the policy's per-GB prices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal

from cluster.catalog import placements
from cluster.config import TIERS
from cluster.tiering.policy import ORDER, Policy, Retention, Rule

# The "to" of a study whose retention ended (crypto-shredded), and then its tier.
DELETED = placements.DELETED
GB = 1e9  # prices are per decimal GB-month, as storage is billed


@dataclass(frozen=True)
class StudyState:
    """What the policy reads about one study (from the catalog)."""

    study_instance_uid: str
    patient_pseudonym: str
    tier: str
    study_date: date | None
    first_ingest_time: datetime
    last_access_time: datetime | None
    tier_since: datetime  # when it came into its tier (its ingest, or its last move)
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    instances: int = 0
    bytes_stored: int = 0
    sources: tuple[str, ...] = ()  # of its instances: "grpc", "dimse:<calling AE>", …

    def age_days(self, now: datetime) -> int:
        born = self.study_date or _utc(self.first_ingest_time).date()
        return (now.date() - born).days

    def unread_days(self, now: datetime) -> float:
        last = self.last_access_time or self.first_ingest_time
        return (now - _utc(last)).total_seconds() / 86_400

    def read_within(self, now: datetime, days: int) -> bool:
        if self.last_access_time is None:
            return False
        return (now - _utc(self.last_access_time)).total_seconds() <= days * 86_400

    def residency_days(self, now: datetime) -> float:
        return (now - _utc(self.tier_since)).total_seconds() / 86_400


@dataclass(frozen=True)
class Decision:
    """One study's move (``to`` a tier) or end of retention (``to`` = DELETED), and the
    rule that decided it."""

    study: StudyState
    action: Literal["move", "delete"]
    to: str
    rule: str


def held(study: StudyState, policy: Policy) -> bool:
    return (
        study.study_instance_uid in policy.held_studies
        or study.patient_pseudonym in policy.held_patients
    )


def decide(study: StudyState, policy: Policy, now: datetime) -> Decision | None:
    """What the policy does with ``study`` at ``now``: None when it stays where it is.

    A held study is never deleted and never moved down (a rule that would move it down
    is passed over; one that moves it up still applies). Retention is decided first: a
    study past its retention end is deleted whatever the move rules say."""
    if study.tier == DELETED:
        return None  # gone for good
    is_held = held(study, policy)
    if not is_held:
        for retention in policy.retention:
            if _retention_matches(retention, study):
                if study.age_days(now) >= retention.keep_days:
                    return Decision(study, "delete", DELETED, retention.name)
                break  # the first matching retention decides
    for rule in policy.rules:
        if study.tier not in rule.from_tiers or rule.to == study.tier:
            continue
        if is_held and ORDER[rule.to] > ORDER[study.tier]:
            continue
        if _matches(rule, study, now):
            return Decision(study, "move", rule.to, rule.name)
    return None


def next_change(study: StudyState, policy: Policy, now: datetime) -> datetime | None:
    """The earliest moment after ``now`` at which ``decide`` could answer otherwise for
    ``study`` if nothing happens to it meanwhile (no ingest, read or move, which the
    catalog notes itself); None when no time condition of the policy can ever flip.

    Conservative: every time threshold of every rule and retention counts (the earliest
    one is when the study must be looked at again), so a study is never looked at late;
    at worst a little early. With it the daily plan reads only the studies whose state
    changed or whose day has come (``CatalogIndex.due_states``), not the archive."""
    if study.tier == DELETED:
        return None
    born = datetime.combine(
        study.study_date or _utc(study.first_ingest_time).date(), time(0), tzinfo=UTC
    )
    last_read = study.last_access_time
    unread_since = _utc(last_read or study.first_ingest_time)
    since = _utc(study.tier_since)
    moments: list[datetime] = []
    for rule in policy.rules:
        if not _can_apply(rule, study):
            continue  # its other conditions do not change with time (a change resets due)
        if rule.min_age_days is not None:
            moments.append(born + timedelta(days=rule.min_age_days))
        if rule.unread_days is not None:
            moments.append(unread_since + timedelta(days=rule.unread_days))
        if rule.read_within_days is not None and last_read is not None:
            moments.append(_utc(last_read) + timedelta(days=rule.read_within_days, microseconds=1))
        if rule.min_residency_days:
            moments.append(since + timedelta(days=rule.min_residency_days))
    for retention in policy.retention:
        if _retention_matches(retention, study):
            moments.append(born + timedelta(days=retention.keep_days))
            break  # the first matching retention decides
    later = [moment for moment in moments if moment > now]
    return min(later) if later else None


def _can_apply(rule: Rule, study: StudyState) -> bool:
    """Whether the rule's conditions that do not depend on time hold for ``study``."""
    if study.tier not in rule.from_tiers or rule.to == study.tier:
        return False
    if rule.modalities and not set(rule.modalities) & {m.upper() for m in study.modalities}:
        return False
    if rule.body_parts and not set(rule.body_parts) & {b.upper() for b in study.body_parts}:
        return False
    return not (rule.sources and not set(rule.sources) & _doors_and_sources(study.sources))


def _matches(rule: Rule, study: StudyState, now: datetime) -> bool:
    if rule.min_age_days is not None and study.age_days(now) < rule.min_age_days:
        return False
    if rule.unread_days is not None and study.unread_days(now) < rule.unread_days:
        return False
    if rule.read_within_days is not None and not study.read_within(now, rule.read_within_days):
        return False
    if rule.modalities and not set(rule.modalities) & {m.upper() for m in study.modalities}:
        return False
    if rule.body_parts and not set(rule.body_parts) & {b.upper() for b in study.body_parts}:
        return False
    if rule.sources and not set(rule.sources) & _doors_and_sources(study.sources):
        return False
    return study.residency_days(now) >= rule.min_residency_days


def _doors_and_sources(sources: tuple[str, ...]) -> set[str]:
    """Each source, and its door alone (a rule naming "dimse" matches "dimse:CT_1")."""
    return set(sources) | {source.partition(":")[0] for source in sources}


def _retention_matches(retention: Retention, study: StudyState) -> bool:
    modalities = {m.upper() for m in study.modalities}
    if retention.modalities and not set(retention.modalities) & modalities:
        return False
    parts = {b.upper() for b in study.body_parts}
    return not (retention.body_parts and not set(retention.body_parts) & parts)


@dataclass(frozen=True)
class Flow:
    """The studies, instances and stored bytes going from one tier to another."""

    source: str
    to: str
    studies: int
    instances: int
    bytes_stored: int


@dataclass
class Plan:
    decisions: list[Decision]
    considered: int  # studies the policy was applied to
    stored_before: Mapping[str, int] = field(default_factory=dict)  # bytes by tier
    stored_after: Mapping[str, int] = field(default_factory=dict)

    @property
    def flows(self) -> list[Flow]:
        studies: Counter[tuple[str, str]] = Counter()
        instances: Counter[tuple[str, str]] = Counter()
        stored: Counter[tuple[str, str]] = Counter()
        for decision in self.decisions:
            key = (decision.study.tier, decision.to)
            studies[key] += 1
            instances[key] += decision.study.instances
            stored[key] += decision.study.bytes_stored
        order = {name: rank for rank, name in enumerate((*TIERS, DELETED))}
        return [
            Flow(source, to, studies[source, to], instances[source, to], stored[source, to])
            for source, to in sorted(studies, key=lambda key: (order[key[0]], order[key[1]]))
        ]


def monthly_cost(stored: Mapping[str, int], policy: Policy) -> dict[str, float]:
    """What each tier's stored bytes cost a month at the policy's prices."""
    return {
        name: stored.get(name, 0) / GB * tier.price_per_gb_month
        for name, tier in policy.tiers.items()
    }


def plan(studies: Iterable[StudyState], policy: Policy, now: datetime | None = None) -> Plan:
    """The policy applied to every study of ``studies``; nothing is changed."""
    moment = now or datetime.now(UTC)
    before: Counter[str] = Counter()
    after: Counter[str] = Counter()
    decisions = []
    considered = 0
    for study in studies:
        considered += 1
        before[study.tier] += study.bytes_stored
        decision = decide(study, policy, moment)
        if decision is None:
            after[study.tier] += study.bytes_stored
            continue
        decisions.append(decision)
        if decision.action == "move":
            after[decision.to] += study.bytes_stored
    return Plan(decisions, considered, dict(before), dict(after))


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
