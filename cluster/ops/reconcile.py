"""Orphan objects: objects in a tier's bucket that no catalog row names, removed.

A worker writes an instance's object before the catalog writer commits its row, and the
sender is answered only after both. A crash in between (a worker, the writer, MinIO or Ray
dying) leaves an object nobody was told is stored: an orphan. Its sender was answered with a
failure and sends again; the orphan itself is plaintext-free but wastes space and, left
alone, would make the store disagree with the catalog for ever.

The reconciler lists the bucket, asks the catalog writer which of the objects' SHA-256 it
knows, and deletes the rest, except objects written less than ``grace`` ago and objects whose
file is in flight in this node (about to be committed). While it deletes one, the dispatcher
holds back any new file with the same bytes, so a resend can never lose its object to it.

Crash leftovers are few: at most the files in flight when something died. Many objects
without a row mean something else: a lost catalog (before ``strata catalog rebuild``), or
a node pointed at another catalog bucket. A pass that finds more than ``ORPHANS_AT_MOST``
orphans making up more than ``ORPHAN_FRACTION_AT_MOST`` of the objects it judged deletes
nothing and says so: deleting would destroy the archive the catalog should be rebuilt from.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cluster.archive.dispatch import Dispatcher, within
from workers.objects import store
from workers.records import StoreSettings

log = logging.getLogger("strata.reconcile")

_SHA256 = re.compile(r"[0-9a-f]{64}")

ORPHANS_AT_MOST = 50
ORPHAN_FRACTION_AT_MOST = 0.1


@dataclass(frozen=True)
class ReconcileReport:
    """What one pass found and did."""

    listed: int
    orphans: int
    removed: int
    kept_in_flight: int
    refused: bool = False


def too_many(orphans: int, judged: int) -> bool:
    """Whether this many orphans among ``judged`` objects look like a lost catalog."""
    return orphans > ORPHANS_AT_MOST and orphans > ORPHAN_FRACTION_AT_MOST * judged


def sha256_of(key: str) -> str | None:
    """The SHA-256 an object key ends with (keys are ``v1/../<sha256>``), or None."""
    last = key.rsplit("/", 1)[-1]
    return last if _SHA256.fullmatch(last) else None


def candidates(
    objects: Iterable[store.ListedObject], now: datetime, grace: timedelta
) -> list[tuple[str, str]]:
    """(key, SHA-256) of the objects old enough to be judged; others are left alone."""
    chosen = []
    for item in objects:
        sha = sha256_of(item.key)
        old_enough = item.last_modified is not None and now - item.last_modified >= grace
        if sha is not None and old_enough:
            chosen.append((item.key, sha))
    return chosen


async def remove_orphans(
    settings: StoreSettings,
    bucket: str,
    catalog: Any,  # the CatalogWriter actor handle
    dispatcher: Dispatcher,
    grace: timedelta,
    now: datetime,
    call_deadline_s: float = 60.0,
) -> ReconcileReport:
    """One pass over ``bucket``: delete every object without a catalog row (see module)."""
    listed = await asyncio.to_thread(lambda: list(store.list_objects(settings, bucket)))
    judged = candidates(listed, now, grace)
    known = set(await _known(catalog, [sha for _, sha in judged], call_deadline_s))
    orphans = [(key, sha) for key, sha in judged if sha not in known]
    if too_many(len(orphans), len(judged)):
        log.error(
            "reconcile of %s: %d of %d objects have no catalog row; that is a lost or "
            "foreign catalog, not crash leftovers: nothing removed (rebuild the catalog "
            "with `strata catalog rebuild`, or check catalog_bucket)",
            bucket,
            len(orphans),
            len(judged),
        )
        return ReconcileReport(len(listed), len(orphans), 0, 0, refused=True)
    removed = kept = 0
    for key, sha in orphans:
        async with dispatcher.removing(sha) as may_remove:
            if not may_remove:
                kept += 1
                continue
            # Committed since the listing? No new file with these bytes can start now.
            if await _known(catalog, [sha], call_deadline_s):
                continue
            await asyncio.to_thread(store.delete, settings, bucket, key)
            removed += 1
            log.warning("removed orphan object %s (no catalog row)", key)
    report = ReconcileReport(len(listed), len(orphans), removed, kept)
    if orphans:
        (log.warning if removed else log.info)(
            "reconcile of %s: %d objects, %d without a catalog row, %d removed, %d in flight",
            bucket,
            report.listed,
            report.orphans,
            report.removed,
            report.kept_in_flight,
        )
    return report


async def _known(catalog: Any, sha256s: Sequence[str], deadline_s: float) -> list[str]:
    if not sha256s:
        return []
    known: list[str] = await within(
        catalog.known_sha256.remote(list(sha256s)), deadline_s, "the catalog writer"
    )
    return known
