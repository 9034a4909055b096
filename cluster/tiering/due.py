"""The daily plan from the catalog writer's index: only the studies that are due.

Each study row in the index carries ``tier_due``, the moment the policy must look at it
again. Any change to the study (an instance ingested, a placement, a read) sets it to 0;
when the plan looks at a study it sets it to ``engine.next_change`` (the earliest moment a
time condition of the policy could flip), or to the plan's own moment when it decided
something (a move or a deletion: looked at again next time, whether or not the apply
carried it out). So a plan reads one range of one B-tree (``tier_due`` before now) and
the few rows those studies have: its cost grows with the studies whose state changed or
whose day came, not with the archive.

A policy the index has not seen (its digest differs) makes every study due once; a plan
only shown (``strata tier plan``) or "as of" another moment reads the due studies without
moving any due moment, or, under a policy not seen yet, every study: only the plans the
node carries out (one at a time) record.

Runs inside the catalog writer (``CatalogWriter.plan_tiering``), one batch per step of
its loop: a batch's rows are read and their due moments written with no ingest, move or
read of them in between.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from cluster.catalog.index import CatalogIndex
from cluster.catalog.schema import StudyRow
from cluster.tiering.engine import Decision, Plan, StudyState, decide, next_change
from cluster.tiering.policy import Policy

BATCH = 5_000  # studies looked at in one step of the writer's loop


def policy_digest(policy: Policy) -> str:
    """A digest of what decides (rules, holds, retention, tiers): equal for the same
    policy in any process."""
    document = dataclasses.asdict(policy)
    document.pop("default_prices", None)
    text = json.dumps(document, sort_keys=True, default=lambda value: sorted(value))
    return hashlib.sha256(text.encode()).hexdigest()


def state_of(index: CatalogIndex, row: StudyRow) -> StudyState:
    parts, placed, sources = index.tier_facts(row.study_instance_uid)
    return StudyState(
        study_instance_uid=row.study_instance_uid,
        patient_pseudonym=row.patient_pseudonym,
        tier=row.tier,
        study_date=row.study_date,
        first_ingest_time=row.first_ingest_time,
        last_access_time=row.last_access_time,
        tier_since=placed or row.first_ingest_time,
        modalities=tuple(row.modalities),
        body_parts=parts,
        instances=row.instance_count,
        bytes_stored=row.bytes_stored,
        sources=sources,
    )


def plan_steps(
    index: CatalogIndex,
    policy: Policy,
    at: datetime | None = None,
    studies: Sequence[str] | None = None,
    *,
    totals: bool = False,
    record: bool = True,
) -> Iterator[Plan | None]:
    """Yields None after each batch (the caller lets its loop run), then the plan.

    ``studies``: only these (a read's promotion check); else the due ones. ``totals``:
    the bytes of every tier before and after, for the plan's prices (a scan of the study
    rows; the scheduled plan does not ask for it)."""
    now = at or datetime.now(UTC)
    record = record and at is None  # only the node's plan as of now moves due moments
    digest = policy_digest(policy)
    every = False
    if studies is None and not index.policy_matches(digest):
        if record:
            index.adopt_policy(digest)  # every study due now, once
        else:
            every = True
    decisions: list[Decision] = []
    considered = 0
    seen: Counter[str] = Counter()

    def look(rows: Sequence[StudyRow]) -> None:
        nonlocal considered
        due: list[tuple[str, datetime | None]] = []
        for row in rows:
            state = state_of(index, row)
            considered += 1
            seen[state.tier] += state.bytes_stored
            decision = decide(state, policy, now)
            if decision is not None:
                decisions.append(decision)
                due.append((row.study_instance_uid, now))
            else:
                due.append((row.study_instance_uid, next_change(state, policy, now)))
        if record:
            index.set_due(due)

    if studies is not None:
        look(index.studies_by_uid(studies))
    else:
        after: tuple[int, str] | None = None
        while batch := index.due_studies(now, after, BATCH, every=every):
            look([row for row, _ in batch])
            after = batch[-1][1]
            yield None
    before: dict[str, int] = index.stored_by_tier() if totals else dict(seen)
    yield Plan(decisions, considered, before, _after(before, decisions))


def _after(before: dict[str, int], decisions: Sequence[Decision]) -> dict[str, int]:
    after: dict[str, Any] = Counter(before)
    for decision in decisions:
        after[decision.study.tier] -= decision.study.bytes_stored
        if decision.action == "move":
            after[decision.to] += decision.study.bytes_stored
    return dict(after)
