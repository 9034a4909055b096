"""A tier's own lossless codec: the packs of a study rewritten, on their way into the
tier, with each instance's pixel data re-encoded and proven.

For each pack a move takes, one GET of the pack and one of its keys object; for each of
its instances (every version the catalog names):

- its member is decrypted and its manifest read;
- pixel data the ingest re-encoded (``split``) in another codec is decoded to the exact
  native value, encoded with the tier's codec, and every frame decoded again and compared
  bit for bit (``encode_verified``); the new member keeps the prefix and suffix segments
  unchanged, with a manifest naming the new stored syntax, and is sealed under a fresh
  data key;
- anything else (a file stored as received or with zstd, a layout the codec cannot hold
  or one it does not make smaller) keeps its member's bytes as they are (members are not
  bound to their pack): only its data key is wrapped again, by the active key, so that
  one keys object serves the new pack.

The new pack and keys object are written under a key the caller chose (and recorded in
its marker first), with the tier's storage class. Then every instance is rebuilt from
the new pack alone, as a retrieval would rebuild it, and its SHA-256 compared with the
catalog's: the original stays retrievable byte for byte, and nothing is committed unless
that holds. The source packs are untouched here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from workers.codecs.lossless import EncodedPixels, NotLossless, decode_to_native, encode_verified
from workers.objects import store
from workers.objects.envelope import (
    KeyRing,
    SealedMember,
    build_pack,
    keys_key_for,
    open_member,
    seal_member,
)
from workers.objects.keys import KeyProvider, cached_key_file
from workers.objects.manifest import Manifest
from workers.pipeline.ingest import PipelineSettings
from workers.pipeline.restore import ObjectRef, restore


class RecodeError(Exception):
    """A pack could not be rewritten or did not verify; nothing was committed."""


@dataclass(frozen=True)
class Rewritten:
    """Where one instance lies in its new pack, and whether its pixels were re-encoded."""

    sha256: str
    object_key: str
    byte_offset: int
    byte_length: int
    key_id: str
    recoded: bool


@dataclass(frozen=True)
class RecodeReport:
    placed: tuple[Rewritten, ...]
    bytes_before: int  # of the members taken
    bytes_after: int
    bytes_written: int  # the new packs and keys objects


def recode_member(
    member: bytes,
    data_key: bytes,
    ref: ObjectRef,
    transfer_syntax: str,
    keys: KeyProvider,
    *,
    only_if_smaller: bool = True,
) -> tuple[SealedMember, bool]:
    """The member of ``ref`` for a tier whose codec is ``transfer_syntax``, and whether its
    pixels were re-encoded (else its bytes are kept, its data key wrapped again)."""
    segments = open_member(
        member, data_key=data_key, sha256=ref.sha256, sop_instance_uid=ref.sop_instance_uid
    )
    manifest = Manifest.from_bytes(segments[0])
    layout = manifest.layout
    if (
        manifest.kind == "split"
        and layout is not None
        and manifest.transfer_syntax_stored != transfer_syntax
    ):
        frames = segments[2:-1]
        native = decode_to_native(
            EncodedPixels(manifest.transfer_syntax_stored, tuple(frames), manifest.trailing), layout
        )
        try:
            encoded = encode_verified(native, layout, transfer_syntax)
        except NotLossless:
            encoded = None  # the codec cannot hold this layout: kept as it is
        smaller = encoded is not None and sum(map(len, encoded.frames)) < sum(map(len, frames))
        if encoded is not None and (smaller or not only_if_smaller):
            stored = replace(manifest, transfer_syntax_stored=transfer_syntax)
            return (
                seal_member(
                    [stored.to_bytes(), segments[1], *encoded.frames, segments[-1]],
                    sha256=ref.sha256,
                    sop_instance_uid=ref.sop_instance_uid,
                    keys=keys,
                ),
                True,
            )
    key_id, wrapped = keys.wrap(data_key)
    return SealedMember(ref.sha256, member, wrapped, key_id), False


def recode_packs(
    settings: PipelineSettings,
    source_tier: str,
    target_tier: str,
    storage_class: str,
    transfer_syntax: str,
    packs: Sequence[tuple[str, str]],  # (source pack key, the new pack's key)
    refs: Sequence[ObjectRef],
) -> RecodeReport:
    """Rewrite each source pack into its new key in the target tier's bucket (see the
    module's docstring); returns where every instance of ``refs`` now lies. Raises
    RecodeError."""
    keys = cached_key_file(settings.key_file)
    source, source_bucket = settings.location(source_tier)
    target, target_bucket = settings.location(target_tier)
    store.ensure_bucket(target, target_bucket)
    placed: list[Rewritten] = []
    before = after = written = 0
    for source_key, new_key in packs:
        mine = [ref for ref in refs if ref.object_key == source_key]
        if not mine:
            continue
        try:
            blob = store.get(source, source_bucket, source_key)
            ring = KeyRing.from_bytes(store.get(source, source_bucket, keys_key_for(source_key)))
        except Exception as error:  # noqa: BLE001 - the store's many failures, one error
            raise RecodeError(f"reading a pack to re-encode failed: {error}") from None
        members: dict[str, tuple[SealedMember, bool]] = {}
        for ref in mine:
            if ref.sha256 in members:
                continue
            member = blob[ref.byte_offset : ref.byte_offset + ref.byte_length]
            members[ref.sha256] = recode_member(
                member, ring.data_key(ref.sha256, keys), ref, transfer_syntax, keys
            )
            before += ref.byte_length
        sealed = [member for member, _ in members.values()]
        pack = build_pack(sealed, keys.active_key_id)
        try:
            store.put(target, target_bucket, keys_key_for(new_key), pack.keys, storage_class)
            store.put(target, target_bucket, new_key, pack.data, storage_class)
        except Exception as error:  # noqa: BLE001
            raise RecodeError(f"writing a re-encoded pack failed: {error}") from None
        written += len(pack.data) + len(pack.keys)
        for where, (sha, (_, recoded)) in zip(pack.members, members.items(), strict=True):
            after += where.length
            placed.append(
                Rewritten(sha, new_key, where.offset, where.length, keys.active_key_id, recoded)
            )
    by_sha = {one.sha256: one for one in placed}
    for ref in refs:  # every instance rebuilt from its new place, as a retrieval would
        new = by_sha[ref.sha256]
        there = replace(
            ref,
            object_key=new.object_key,
            tier=target_tier,
            byte_offset=new.byte_offset,
            byte_length=new.byte_length,
        )
        try:
            rebuilt = restore(there, "original", settings)
        except Exception as error:  # noqa: BLE001 - any failure to rebuild is a failed proof
            raise RecodeError(
                f"an instance re-encoded for the {target_tier} tier did not rebuild "
                f"({type(error).__name__})"
            ) from None
        if rebuilt.sha256 != ref.sha256:
            raise RecodeError(
                f"an instance re-encoded for the {target_tier} tier rebuilt to another SHA-256"
            )
    return RecodeReport(tuple(placed), before, after, written)
