"""Orphan packs: packs in a tier's bucket that no catalog row names, removed.

A worker writes a pack (and its keys object) before the catalog writer commits its rows,
and the senders are answered only after both. A crash in between (a worker, the writer,
MinIO or Ray dying) leaves a pack nobody was told is stored: an orphan. Its senders were
answered with a failure and send again (into a new pack: pack keys are never reused); the
orphan itself is plaintext-free but wastes space and, left alone, would make the store
disagree with the catalog for ever. A pack whose files all turned out to be duplicates is
an orphan too.

The reconciler lists the bucket, reads the header of each pack written at least ``grace``
ago (which SHA-256s it holds), asks the catalog writer which of those packs a row names
(the row's current tier and pack, or a commit in progress), and deletes the rest with
their keys objects, except packs holding a file in flight in this node (about to be
committed). A keys object whose pack is gone is deleted too. An object that is not a pack
it can read is left alone and reported: the reconciler deletes only what it understands.

Crash leftovers are few: at most the batches in flight when something died. Many packs
without a row mean something else: a lost catalog (before ``strata catalog rebuild``), or
a node pointed at another catalog bucket. A pass that finds more than ``ORPHANS_AT_MOST``
orphans making up more than ``ORPHAN_FRACTION_AT_MOST`` of the packs it judged deletes
nothing and says so: deleting would destroy the archive the catalog should be rebuilt from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cluster.archive.dispatch import Dispatcher, within
from workers.objects import store
from workers.objects.envelope import (
    KEYS_SUFFIX,
    EnvelopeError,
    KeyRing,
    keys_key_for,
    pack_header_length,
    read_pack_header,
)
from workers.pipeline.recover import is_pack
from workers.records import StoreSettings

log = logging.getLogger("strata.reconcile")

ORPHANS_AT_MOST = 50
ORPHAN_FRACTION_AT_MOST = 0.1


@dataclass(frozen=True)
class ReconcileReport:
    """What one pass found and did (counted in packs)."""

    listed: int
    orphans: int
    removed: int
    kept_in_flight: int
    refused: bool = False
    unreadable: int = 0


def too_many(orphans: int, judged: int) -> bool:
    """Whether this many orphans among ``judged`` packs look like a lost catalog."""
    return orphans > ORPHANS_AT_MOST and orphans > ORPHAN_FRACTION_AT_MOST * judged


def candidates(
    objects: Iterable[store.ListedObject], now: datetime, grace: timedelta
) -> tuple[list[store.ListedObject], list[str]]:
    """The packs old enough to be judged, and the keys objects old enough whose pack is
    not listed; other objects are left alone."""
    listed = {item.key for item in objects if is_pack(item.key)}
    packs, lone_keys = [], []
    for item in objects:
        if item.last_modified is None or now - item.last_modified < grace:
            continue
        if not item.key.startswith(PACK_PREFIX):
            continue  # not a name Strata gives
        if is_pack(item.key):
            packs.append(item)
        elif item.key.removesuffix(KEYS_SUFFIX) not in listed:
            lone_keys.append(item.key)
    return packs, lone_keys


PACK_PREFIX = "v2/"


async def remove_orphans(
    settings: StoreSettings,
    bucket: str,
    tier: str,
    catalog: Any,  # the CatalogWriter actor handle
    dispatcher: Dispatcher,
    grace: timedelta,
    now: datetime,
    call_deadline_s: float = 60.0,
    in_motion: frozenset[str] = frozenset(),
) -> ReconcileReport:
    """One pass over ``bucket`` (tier ``tier``): delete every pack no catalog row names,
    and keys objects without their pack (see module). Packs ``in_motion`` (a tier move
    has begun copying them: cluster/tiering/apply.py) are left alone, whatever their
    age: their placement is about to be committed, or the move undone by its own apply."""
    listed = await asyncio.to_thread(lambda: list(store.list_objects(settings, bucket)))
    packs, lone_keys = candidates(listed, now, grace)
    members: dict[str, list[str]] = {}
    unreadable = 0
    for item in packs:
        try:
            members[item.key] = await asyncio.to_thread(_members, settings, bucket, item)
        except (EnvelopeError, ValueError) as error:
            unreadable += 1
            log.warning("reconcile: %s is not a pack it can read, left alone: %s", item.key, error)
    live = set(await _referenced(catalog, tier, members, call_deadline_s))
    orphans = [key for key in members if key not in live and key not in in_motion]
    if too_many(len(orphans), len(members)):
        log.error(
            "reconcile of %s: %d of %d packs have no catalog row; that is a lost or "
            "foreign catalog, not crash leftovers: nothing removed (rebuild the catalog "
            "with `strata catalog rebuild`, or check catalog_bucket)",
            bucket,
            len(orphans),
            len(members),
        )
        return ReconcileReport(len(packs), len(orphans), 0, 0, refused=True)
    removed = kept = 0
    for key in orphans:
        async with contextlib.AsyncExitStack() as held:
            held_back = True
            for sha in members[key]:
                if not await held.enter_async_context(dispatcher.removing(sha)):
                    held_back = False
                    break
            if not held_back:
                kept += 1
                continue
            # Committed since the listing? No file of this pack can start now.
            if await _referenced(catalog, tier, {key: members[key]}, call_deadline_s):
                continue
            await asyncio.to_thread(store.delete_many, settings, bucket, [key, keys_key_for(key)])
            removed += 1
            log.warning("removed orphan pack %s (no catalog row names it)", key)
    lone_removed = 0
    for keys_key in lone_keys:
        lone_removed += await _remove_lone_keys(settings, bucket, keys_key, dispatcher)
    if lone_removed:
        log.warning("removed %d keys objects whose pack is gone", lone_removed)
    report = ReconcileReport(len(packs), len(orphans), removed, kept, unreadable=unreadable)
    if orphans:
        (log.warning if removed else log.info)(
            "reconcile of %s: %d packs judged, %d without a catalog row, %d removed, %d in flight",
            bucket,
            report.listed,
            report.orphans,
            report.removed,
            report.kept_in_flight,
        )
    return report


async def _remove_lone_keys(
    settings: StoreSettings, bucket: str, keys_key: str, dispatcher: Dispatcher
) -> int:
    """Delete a keys object whose pack is not there, unless a file it holds a key for is
    in flight (a worker writes a pack and its keys object at once: the keys object can
    land first) or its pack has landed since the listing; 1 if deleted."""
    try:
        blob = await asyncio.to_thread(store.get, settings, bucket, keys_key)
        shas = list(KeyRing.from_bytes(blob).wrapped)
    except store.ObjectUnreadableError:
        return 0  # gone already
    except EnvelopeError as error:
        log.warning(
            "reconcile: %s is not a keys object it can read, left alone: %s", keys_key, error
        )
        return 0
    async with contextlib.AsyncExitStack() as held:
        for sha in shas:
            if not await held.enter_async_context(dispatcher.removing(sha)):
                return 0
        pack = keys_key.removesuffix(KEYS_SUFFIX)
        if await asyncio.to_thread(store.exists, settings, bucket, pack):
            return 0
        await asyncio.to_thread(store.delete, settings, bucket, keys_key)
    return 1


def _members(settings: StoreSettings, bucket: str, item: store.ListedObject) -> list[str]:
    """The SHA-256 of each member of a listed pack, from its header (ranged GETs)."""
    size = item.size or 0
    first = store.get(settings, bucket, item.key, 0, min(size, _HEADER_READ) or _HEADER_READ)
    needed = pack_header_length(first)
    if needed > len(first):
        first = store.get(settings, bucket, item.key, 0, needed)
    return [member.sha256 for member in read_pack_header(first).members]


_HEADER_READ = 16 * 1024


async def _referenced(
    catalog: Any, tier: str, members: dict[str, list[str]], deadline_s: float
) -> list[str]:
    if not members:
        return []
    packs = [(key, shas) for key, shas in members.items()]
    live: list[str] = await within(
        catalog.referenced_packs.remote(tier, packs), deadline_s, "the catalog writer"
    )
    return live
