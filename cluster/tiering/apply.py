"""Carrying a tier plan out: copy, verify, commit the placement, delete the source.

One study moves at a time per worker core, in a Ray task (``copy_and_verify``) and then
in this process (the catalog writer's commit, the deletes):

1. A *marker* object, ``tiering/moving/<study hash>.json`` in the catalog bucket, says a
   move of this study from one tier to another has begun, and which packs it moves.
2. Each pack and its keys object are copied server-side into the target tier's bucket
   (with the tier's storage class, so with its parity).
3. Every instance (every version) is read back from the copy, decrypted, rebuilt and its
   SHA-256 checked against the catalog's: the copy is proven before anything relies on it.
4. The study's new placements, every instance's in one call, are committed by the catalog
   writer (one journal group: the whole study is placed, or none of it).
5. The source packs are deleted, then the marker.

Killed at any step and run again, the apply first finishes what its markers say was
begun: if the catalog places the study in the target tier, the sources left are deleted;
if not, the copies are deleted (the study is planned again). So no object is lost (a
source is deleted only after its copy is proven and committed), none is left orphaned,
and the catalog never places a study in two tiers.

A study whose retention has ended is deleted by crypto-shredding, also resumable:

1. A marker ``tiering/deleting/<study hash>.json`` names the study's packs.
2. Every instance (every version) is placed in the tier ``deleted`` (one journal group):
   from then on the catalog records the deletion (the rule, the time) and no door finds
   or reads the study; a copy sent again is refused, not stored.
3. The keys objects of its packs are deleted (the data keys are gone, so the packs are
   ciphertext nobody can open), then the packs, then whatever else lies under the
   study's prefix that no live instance names; a listing checks that no keys object of
   the study is left in any tier.
4. The marker is deleted.

Killed before step 2 landed, the next apply drops the marker (nothing was touched, the
study is planned again); after it, the next apply shreds what is left.

A tier with its own ``codec`` (say, JPEG-LS for cold) gets new packs instead of copies:
``workers.pipeline.recode`` decodes each instance's pixels, encodes them with the tier's
codec, proves every frame bit for bit and every instance's rebuilt SHA-256, and the
placements name the new packs' byte ranges (the marker names the new keys before they
are written, so an interrupted move deletes them).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import ray
from minio.commonconfig import REPLACE, CopySource

from cluster.catalog.placements import Placement, deletion
from cluster.catalog.queries import InstanceFilters
from cluster.config import CODECS
from cluster.tiering.engine import Decision
from cluster.tiering.policy import Policy, Tier
from workers.objects import store
from workers.objects.envelope import keys_key_for
from workers.pipeline.ingest import PipelineSettings
from workers.pipeline.recode import RecodeError, RecodeReport, recode_packs
from workers.pipeline.restore import ObjectRef, restore
from workers.records import InstanceRecord, StoreSettings

log = logging.getLogger("strata.tiering")

MARKERS = "tiering/moving/"
DELETING = "tiering/deleting/"
MOVE_DEADLINE_S = 1800.0  # one study's copy and verification
_MOST_INSTANCES = 1_000_000  # of one study, asked of the catalog at once


class MoveError(Exception):
    """A study could not be moved; it stays where it was."""


@dataclass(frozen=True)
class Marker:
    """A move begun: the study, its packs in the source tier, and their copies' keys in
    the target (the same keys for a copy; new ones for packs rewritten with the target
    tier's codec)."""

    study_instance_uid: str
    source: str
    target: str
    packs: tuple[str, ...]
    copies: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return marker_key(self.study_instance_uid)

    @property
    def target_keys(self) -> tuple[str, ...]:
        return self.copies or self.packs

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "study": self.study_instance_uid,
                "from": self.source,
                "to": self.target,
                "packs": list(self.packs),
                "copies": list(self.copies),
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Marker:
        document = json.loads(data)
        return cls(
            document["study"],
            document["from"],
            document["to"],
            tuple(document["packs"]),
            tuple(document.get("copies", ())),
        )


@dataclass(frozen=True)
class DeletionMarker:
    """A retention deletion begun: the study and its packs, as (tier, key)."""

    study_instance_uid: str
    packs: tuple[tuple[str, str], ...]

    @property
    def key(self) -> str:
        return marker_key(self.study_instance_uid, DELETING)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"study": self.study_instance_uid, "packs": [list(pack) for pack in self.packs]}
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DeletionMarker:
        document = json.loads(data)
        return cls(document["study"], tuple((tier, key) for tier, key in document["packs"]))


def marker_key(study_instance_uid: str, prefix: str = MARKERS) -> str:
    return prefix + hashlib.sha256(study_instance_uid.encode()).hexdigest()[:32] + ".json"


def packs_in_motion(settings: StoreSettings, catalog_bucket: str) -> frozenset[str]:
    """The packs that moves in progress name (their markers): the reconciler must not
    take their copies for orphans."""
    found: set[str] = set()
    for key in store.list_keys(settings, catalog_bucket, MARKERS):
        try:
            marker = Marker.from_bytes(store.get(settings, catalog_bucket, key))
            found.update(marker.packs, marker.target_keys)
        except store.ObjectUnreadableError:
            continue  # finished meanwhile
    return frozenset(found)


def copy_packs(settings: PipelineSettings, packs: Sequence[str], source: str, target: Tier) -> int:
    """Copy each pack and its keys object from tier ``source`` to ``target``: inside the
    store (server-side: the bytes do not pass through here) when both tiers are in one,
    else read and written again; returns the bytes copied."""
    source_store, source_bucket = settings.location(source)
    target_store, target_bucket = settings.location(target.name)
    store.ensure_bucket(target_store, target_bucket)
    same_store = source_store == target_store
    client = store.client(target_store)
    headers: dict[str, str | list[str] | tuple[str]] = {"x-amz-storage-class": target.storage_class}
    copied = 0
    for pack in packs:
        for key in (pack, keys_key_for(pack)):
            try:
                if same_store:
                    client.copy_object(
                        target_bucket,
                        key,
                        CopySource(source_bucket, key),
                        metadata=headers,
                        metadata_directive=REPLACE,
                    )
                else:  # another endpoint (a second deployment for cold): no server-side copy
                    data = store.get(source_store, source_bucket, key)
                    store.put(target_store, target_bucket, key, data, target.storage_class)
                copied += client.stat_object(target_bucket, key).size or 0
            except Exception as error:  # noqa: BLE001 - the store's many failures, one error
                raise MoveError(
                    f"copying a pack to the {target.name} tier failed: {store.describe(error)}"
                ) from None
    return copied


def copy_and_verify(
    settings: PipelineSettings,
    packs: list[str],
    source: str,
    target: Tier,
    refs: list[ObjectRef],
) -> int:
    """Copy the packs (see ``copy_packs``), then prove every instance's copy: read from the
    target, decrypted, rebuilt, SHA-256 as catalogued. Returns the bytes copied; raises
    MoveError naming what failed (the sources are untouched either way)."""
    copied = copy_packs(settings, packs, source, target)
    for ref in refs:
        try:
            restored = restore(replace(ref, tier=target.name), "original", settings)
        except Exception as error:  # noqa: BLE001 - any failure to rebuild is a failed proof
            raise MoveError(
                f"the copy of an instance in the {target.name} tier did not verify "
                f"({type(error).__name__})"
            ) from None
        if restored.sha256 != ref.sha256:
            raise MoveError(f"the copy in the {target.name} tier rebuilt to another SHA-256")
    return copied


_copy_task = ray.remote(num_cpus=1, max_retries=2)(copy_and_verify)
_recode_task = ray.remote(num_cpus=1, max_retries=2)(recode_packs)


@dataclass
class ApplyProgress:
    studies_total: int = 0
    studies_done: int = 0
    studies_failed: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    resumed: int = 0
    studies_deleted: int = 0  # past their retention: placed nowhere, keys destroyed
    recoded_bytes_before: int = 0  # members re-encoded with the target tier's codec
    recoded_bytes_after: int = 0
    not_carried_out: int = 0
    message: str = ""
    failures: list[str] = field(default_factory=list)


class TierApplier:
    """Moves studies as decided, through the node's catalog writer and Ray workers."""

    def __init__(
        self,
        settings: PipelineSettings,
        catalog: Any,  # the CatalogWriter actor handle
        catalog_bucket: str,
        policy: Policy,
        *,
        concurrency: int = 2,
    ) -> None:
        self._settings = settings
        self._store = settings.store
        self._catalog = catalog
        self._bucket = catalog_bucket
        self._policy = policy
        self._concurrency = max(1, concurrency)
        # Bytes of the members re-encoded for a tier's own codec, before and after.
        self.recoded_bytes = [0, 0]

    async def apply(self, decisions: Sequence[Decision]) -> AsyncIterator[ApplyProgress]:
        """Finish interrupted moves, then carry out ``decisions``; yields progress after
        each step."""
        progress = ApplyProgress()
        moves = [d for d in decisions if d.action in ("move", "delete")]
        progress.not_carried_out = len(decisions) - len(moves)
        progress.studies_total = len(moves)
        progress.bytes_total = sum(d.study.bytes_stored for d in moves)
        progress.resumed = await self.recover()
        if progress.resumed:
            progress.message = f"finished {progress.resumed} moves an earlier apply had begun"
        yield progress
        queue: asyncio.Queue[ApplyProgress] = asyncio.Queue()
        slots = asyncio.Semaphore(self._concurrency)

        async def one(decision: Decision) -> None:
            async with slots:
                deleting = decision.action == "delete"
                try:
                    await (self.delete(decision) if deleting else self.move(decision))
                except Exception as error:  # noqa: BLE001 - this study stays; the rest go on
                    progress.studies_failed += 1
                    progress.message = f"a study stayed in {decision.study.tier}: {error}"
                    progress.failures.append(str(error))
                    log.error("tier %s failed: %s", "deletion" if deleting else "move", error)
                else:
                    progress.studies_done += 1
                    progress.bytes_done += decision.study.bytes_stored
                    progress.recoded_bytes_before, progress.recoded_bytes_after = self.recoded_bytes
                    if deleting:
                        progress.studies_deleted += 1
                        progress.message = (
                            f"deleted a study at its retention end ({decision.rule}): "
                            "its keys are destroyed"
                        )
                    else:
                        progress.message = f"moved a study {decision.study.tier} → {decision.to}"
                await queue.put(progress)

        tasks = [asyncio.create_task(one(decision)) for decision in moves]
        try:
            for _ in tasks:
                yield await queue.get()
            await asyncio.gather(*tasks)
        finally:
            # Left early (the caller went away): no move goes on behind the next apply's
            # back; what a cancelled one had begun, its marker says, and the next finishes.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def move(self, decision: Decision) -> None:
        study = decision.study.study_instance_uid
        source, target = decision.study.tier, self._policy.tiers[decision.to]
        records = await self._instances_of(study)
        moving = [record for record in records if record.tier == source]
        if not moving:
            return  # already moved (by an earlier apply): nothing to do
        packs = tuple(sorted({record.object_key for record in moving}))
        codec = CODECS.get(target.codec) if target.codec else None
        # A tier with its own codec gets new packs (rewritten), under keys chosen now so
        # that the marker names them before they exist.
        copies = tuple(store.pack_key_for(study) for _ in packs) if codec else ()
        marker = Marker(study, source, target.name, packs, copies)
        await asyncio.to_thread(store.put, self._store, self._bucket, marker.key, marker.to_bytes())
        refs = [ObjectRef.of(record) for record in moving]
        ref: ray.ObjectRef[Any]
        if codec:
            ref = _recode_task.remote(
                self._settings,
                source,
                target.name,
                target.storage_class,
                codec,
                list(zip(packs, copies, strict=True)),
                refs,
            )
        else:
            ref = _copy_task.remote(self._settings, list(packs), source, target, refs)
        try:
            report = await asyncio.wait_for(ref, MOVE_DEADLINE_S)
        except asyncio.CancelledError:
            ray.cancel(ref, force=True)  # it writes no copy after this; the marker stays
            raise
        except Exception as error:  # noqa: BLE001 - whatever failed, the copies are undone
            if isinstance(error, TimeoutError):
                ray.cancel(ref, force=True)
            await self._undo(marker)
            if isinstance(error, TimeoutError):
                raise MoveError(
                    f"copying a study did not finish within {MOVE_DEADLINE_S:g} s"
                ) from None
            cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
            known = isinstance(cause, MoveError | RecodeError)
            raise MoveError(str(cause) if known else repr(cause)) from None
        now = datetime.now(UTC)
        reason = f"tier move: {decision.rule}"
        if isinstance(report, RecodeReport):
            where = {one.sha256: one for one in report.placed}
            recoded = sum(one.recoded for one in report.placed)
            reason += f"; {recoded} of {len(report.placed)} re-encoded as {target.codec}"
            self.recoded_bytes[0] += report.bytes_before
            self.recoded_bytes[1] += report.bytes_after
        else:
            where = {}
        placements = []
        for record in moving:
            new = where.get(record.sha256)
            placements.append(
                Placement(
                    record.sha256,
                    record.sop_instance_uid,
                    record.version,
                    study,
                    target.name,
                    self._settings.location(target.name)[1],
                    new.object_key if new else record.object_key,
                    new.byte_offset if new else record.byte_offset,
                    new.byte_length if new else record.byte_length,
                    new.key_id if new else record.key_id,
                    reason,
                    now,
                    # What the object holds there: the tier's codec if re-encoded, else
                    # what it held (a plain copy carries an earlier re-encoding along).
                    codec
                    if codec is not None and new is not None and new.recoded
                    else record.transfer_syntax_stored,
                )
            )
        try:
            await self._catalog.place.remote(placements, [source])
        except ray.exceptions.RayTaskError as error:
            await self._undo(marker)  # the catalog refused it: the study stays where it is
            raise MoveError(str(error.cause)) from None
        # The sources go only once the catalog is seen to place every instance in the copy.
        now_records = await self._instances_of(study)
        where_now = {record.sha256: (record.tier, record.object_key) for record in now_records}
        if any(where_now.get(p.sha256) != (p.tier, p.object_key) for p in placements):
            await self._undo(marker)
            raise MoveError("the catalog did not take the study's new placements; it stays")
        await self._finish(marker, placed=True)

    async def delete(self, decision: Decision) -> None:
        """Delete a study at the end of its retention: record it in the catalog, then
        destroy its keys (see the module's docstring)."""
        study = decision.study.study_instance_uid
        records = await self._instances_of(study)
        if not records:
            return  # deleted already (by an earlier apply): nothing to do
        packs = tuple(sorted({(record.tier, record.object_key) for record in records}))
        marker = DeletionMarker(study, packs)
        await asyncio.to_thread(store.put, self._store, self._bucket, marker.key, marker.to_bytes())
        now = datetime.now(UTC)
        reason = f"retention end: {decision.rule}; data keys destroyed (crypto-shredded)"
        try:
            await self._catalog.place.remote(
                [
                    deletion(
                        record.sha256, record.sop_instance_uid, record.version, study, reason, now
                    )
                    for record in records
                ],
                sorted({record.tier for record in records}),
            )
        except ray.exceptions.RayTaskError as error:
            await asyncio.to_thread(store.delete, self._store, self._bucket, marker.key)
            raise MoveError(str(error.cause)) from None
        await self._shred(marker)

    async def _shred(self, marker: DeletionMarker) -> None:
        """Destroy the keys of the packs a deletion the catalog holds names, then the packs;
        then the marker. Only those: a pack of the same study being stored meanwhile (an
        instance sent after the deletion was decided) is not this deletion's, and packs no
        row names are the reconciler's."""
        by_tier: dict[str, list[str]] = {}
        for tier, key in marker.packs:
            by_tier.setdefault(tier, []).append(key)

        def shred() -> None:
            for tier, packs in sorted(by_tier.items()):
                where, bucket = self._settings.location(tier)
                if not store.bucket_exists(where, bucket):
                    continue
                # The keys first: once they are gone the packs can no longer be opened.
                store.delete_many(where, bucket, [keys_key_for(pack) for pack in packs])
                store.delete_many(where, bucket, packs)
                left = [pack for pack in packs if store.exists(where, bucket, keys_key_for(pack))]
                if left:
                    raise MoveError(
                        f"{len(left)} keys objects of a deleted study are left in {bucket}"
                    )

        await asyncio.to_thread(shred)
        await asyncio.to_thread(store.delete, self._store, self._bucket, marker.key)

    async def recover(self) -> int:
        """Finish the moves and deletions whose markers are left; returns how many there
        were."""
        resumed = 0
        for key, data in await self._markers(DELETING):
            marker = DeletionMarker.from_bytes(data)
            live = await self._instances_of(marker.study_instance_uid)
            named = {pack for _, pack in marker.packs}
            try:
                if any(record.object_key in named for record in live):
                    log.info("an interrupted retention deletion had not been recorded: undone")
                    await asyncio.to_thread(store.delete, self._store, self._bucket, key)
                else:
                    log.info("finishing an interrupted retention deletion: destroying its keys")
                    await self._shred(marker)
            except Exception as error:  # noqa: BLE001 - the next apply tries it again
                log.error("an interrupted retention deletion could not be finished: %s", error)
                continue
            resumed += 1
        return resumed + await self._recover_moves()

    async def _recover_moves(self) -> int:
        """Finish the moves whose markers are left; returns how many there were."""
        markers = await self._markers(MARKERS)
        for _, data in markers:
            marker = Marker.from_bytes(data)
            records = await self._instances_of(marker.study_instance_uid)
            still = [
                record
                for record in records
                if record.tier == marker.source and record.object_key in marker.packs
            ]
            copied = [
                record
                for record in records
                if record.tier == marker.target and record.object_key in marker.target_keys
            ]
            placed = bool(copied) and not still  # the placements land in one group
            log.info(
                "finishing an interrupted tier move (%s → %s): %s",
                marker.source,
                marker.target,
                "committed, deleting the sources" if placed else "not committed, undoing the copy",
            )
            try:
                await self._finish(marker, placed=placed)
            except Exception as error:  # noqa: BLE001 - the next apply tries it again
                log.error("an interrupted tier move could not be finished: %s", error)
        return len(markers)

    async def _instances_of(self, study_instance_uid: str) -> list[InstanceRecord]:
        """Every instance (every version) of a study the catalog holds, not deleted."""
        records: list[InstanceRecord] = await self._catalog.find_instances.remote(
            InstanceFilters(study_uid=study_instance_uid), _MOST_INSTANCES
        )
        return records

    async def _markers(self, prefix: str) -> list[tuple[str, bytes]]:
        """The markers under ``prefix`` left by earlier applies: (key, contents)."""

        def read() -> list[tuple[str, bytes]]:
            return [
                (key, store.get(self._store, self._bucket, key))
                for key in store.list_keys(self._store, self._bucket, prefix)
            ]

        return await asyncio.to_thread(read)

    async def _undo(self, marker: Marker) -> None:
        await self._finish(marker, placed=False)

    async def _finish(self, marker: Marker, *, placed: bool) -> None:
        """Delete the sources (the move was committed) or the copies (it was not), then the
        marker."""
        where, bucket = self._settings.location(marker.source if placed else marker.target)
        packs = marker.packs if placed else marker.target_keys
        keys = [key for pack in packs for key in (pack, keys_key_for(pack))]
        if await asyncio.to_thread(store.bucket_exists, where, bucket):
            await asyncio.to_thread(store.delete_many, where, bucket, keys)
        await asyncio.to_thread(store.delete, self._store, self._bucket, marker.key)
