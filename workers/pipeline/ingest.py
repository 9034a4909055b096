"""The per-instance ingest pipeline: parse, split, encode, verify, encrypt, store.

``ingest_batch`` is what a Ray task runs: plain data in, plain data out. Which files go in
one batch, and how many batches run at once, is decided in ``cluster/dispatch.py``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import imagecodecs
import ray
from pydicom.uid import DeflatedExplicitVRLittleEndian

from workers.codecs.lossless import (
    NotLossless,
    decode_to_native,
    encode_verified,
    lossless_transfer_syntaxes,
    values_fit_bits_stored,
)
from workers.dicom.identity import IdentityRow, identity_keys
from workers.dicom.split import (
    InstanceHeader,
    PixelLayout,
    SplitFile,
    sample_bytes,
    split_file,
    swap_pairs,
)
from workers.errors import Reason, RejectError
from workers.objects import store
from workers.objects.envelope import Pack, SealedMember, build_pack, keys_key_for, seal_member
from workers.objects.keys import Pseudonymizer, cached_key_file
from workers.objects.manifest import Manifest
from workers.pipeline.fanout import FrameFanout
from workers.records import (
    HTJ2K_LOSSLESS,
    IngestItem,
    InstanceRecord,
    Outcome,
    Rejected,
    Stored,
    StoreSettings,
    TierLocation,
    syntax_name,
)

log = logging.getLogger("strata.workers.ingest")

# A codec (or zstd) must make the pixel data at least 5 % smaller to be worth storing.
MIN_SAVING = 0.95
ZSTD_LEVEL = 3  # fast enough to stay well below the codec's cost, most of the gain
# When the policy's codec cannot hold a layout, the next one tried (best ratio first).
_CODEC_PREFERENCE = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    HTJ2K_LOSSLESS,
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Process 14 (predictor 4)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14, selection value 1
)


@dataclass(frozen=True)
class PipelineSettings:
    """Everything a worker needs to store an instance; passed to every task."""

    store: StoreSettings
    key_file: str
    tier: str = "hot"
    transfer_syntax: str = HTJ2K_LOSSLESS  # the tier's codec
    # Per-modality exceptions for this tier: (modality, transfer syntax) pairs.
    modality_codecs: tuple[tuple[str, str], ...] = ()
    fanout: FrameFanout = field(default_factory=FrameFanout)
    # A codec or zstd is used only if the result is at most this fraction of the input.
    min_saving: float = MIN_SAVING
    # The most bytes a data set may take once inflated or decoded (max_file_bytes): a
    # small deflated or compressed file that would expand past it is refused unexpanded.
    max_file_bytes: int | None = None
    # Tiers whose objects live elsewhere than the bucket strata-<tier> of ``store``.
    locations: tuple[TierLocation, ...] = ()

    def location(self, tier: str) -> tuple[StoreSettings, str]:
        """The store and bucket that hold ``tier``'s objects."""
        for where in self.locations:
            if where.tier == tier:
                return where.store, where.bucket
        return self.store, store.tier_bucket(tier)

    def codecs_for(self, modality: str) -> list[str]:
        """Lossless syntaxes to try, in order: the policy's choice, then the others."""
        first = dict(self.modality_codecs).get(modality, self.transfer_syntax)
        others = sorted(lossless_transfer_syntaxes() - {first}, key=_preference)
        return [first, *others]


@dataclass(frozen=True)
class BatchResult:
    """One outcome per item of a batch, in order, and the CPU seconds the worker process
    spent on the batch (the in-task work, which the ingest benchmark sets beside the
    workers' whole CPU time to show Ray's own overhead)."""

    outcomes: list[Outcome]
    cpu_seconds: float
    wall_seconds: float = 0.0  # the whole task, in the worker
    store_seconds: float = 0.0  # of which waiting on and writing to the object store


def ingest_batch(items: list[IngestItem], settings: PipelineSettings) -> BatchResult:
    """Store every item it can; one outcome per item, in order. One bad file never stops
    the others.

    The files of one study in the batch are written as one pack (two PUTs: the pack and
    its keys object) instead of one object each: a small erasure-coded PUT costs more CPU
    than encoding the image (docs/object-format.md measures it)."""
    started = time.process_time()
    began = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    shared = [item for item in items if _may_share_cores(item)] if len(items) > 1 else []
    ready = dict(
        zip(
            (item.file_id for item in shared),
            _PREPARING.map(lambda item: _prepared(item, settings), shared),
            strict=True,
        )
    )
    made = [
        ready[item.file_id] if item.file_id in ready else _prepared(item, settings)
        for item in items
    ]
    prepared: list[Prepared] = []
    for one in made:
        if isinstance(one, Prepared):
            prepared.append(one)
        else:
            outcomes[one.file_id] = one
    del made
    storing = time.perf_counter()
    for study in _by_study(prepared):
        try:
            outcomes.update((stored.file_id, stored) for stored in store_pack(study, settings))
        except StorageError as error:
            log.error("a pack of %d files: the object store refused it: %s", len(study), error)
            for one in study:
                outcomes[one.file_id] = Rejected(
                    one.file_id,
                    Reason.STORAGE_FAILED.value,
                    "the object store did not accept this file (it is unavailable or "
                    "restarting); nothing was committed for it, send it again",
                )
    ordered = [outcomes[item.file_id] for item in items]
    ended = time.perf_counter()
    return BatchResult(ordered, time.process_time() - started, ended - began, ended - storing)


def _prepared(item: IngestItem, settings: PipelineSettings) -> Prepared | Rejected:
    """One file prepared (``prepare``), or why not; never raises."""
    try:
        whole = _gathered(item)
    except Exception as error:  # noqa: BLE001 - this file's parts are gone, not the batch's
        log.error("file %s: its parts could not be read: %s", _short(item.sha256), error)
        return Rejected(item.file_id, Reason.STORAGE_FAILED.value, _PARTS_LOST)
    try:
        return prepare(whole, settings)
    except RejectError as error:
        return Rejected(item.file_id, error.reason.value, error.message)
    except Exception as error:
        log.exception("file %s failed in the pipeline", _short(item.sha256))
        return Rejected(
            item.file_id,
            Reason.INTERNAL.value,
            f"the pipeline failed with {type(error).__name__}; nothing was stored "
            "for this file and the error was logged",
        )


# The small files of one batch are prepared on two cores at once: the codecs let go of
# the GIL (two threads encoded and verified 1.6 times as many CT slices a second as one),
# so a task held by four DIMSE associations' files uses the cores of two, and its batch is
# still one pack per study (two PUTs) instead of one per task. Ray counts the task as one
# CPU, so a node whose every core runs a task runs at most twice as many threads as cores.
_PREPARING = ThreadPoolExecutor(2, thread_name_prefix="strata-prepare")
_DEFLATED = DeflatedExplicitVRLittleEndian.encode()


def _may_share_cores(item: IngestItem) -> bool:
    """Whether ``item`` is prepared in a pool thread: only a file that came whole (under
    the front end's 4 MiB part size) and is not deflated. A larger one may fan its frames
    out over Ray tasks, and ``ray.get`` gives a task's CPU back to Ray only from its main
    thread (from another, the runs could wait for a CPU the waiting task holds); a
    deflated one is inflated up to ``max_file_bytes``, which threads would multiply. (The
    transfer syntax is in the file meta, within its first few hundred bytes; a false
    "deflated" only keeps a file on the main thread.)"""
    return not item.parts and _DEFLATED not in bytes(item.data[:4096])


@dataclass(frozen=True)
class Prepared:
    """One file sealed as a pack member, with its catalog and identity rows (the row's
    ``object_key`` and byte range still to be set by ``pack_instances``)."""

    file_id: str
    member: SealedMember
    record: InstanceRecord
    identity: IdentityRow


# A pack closes once it holds this many bytes: below minio-py's multipart threshold
# (5 MiB), where one PUT is one request; larger packs measured no cheaper per instance
# (bench/packs.py, docs/object-format.md).
PACK_MAX_BYTES = 4 * 1024 * 1024


def _by_study(prepared: list[Prepared]) -> list[list[Prepared]]:
    """The packs to write: each study's files in arrival order, a new pack whenever the
    current one has reached ``PACK_MAX_BYTES``."""
    packs: list[list[Prepared]] = []
    open_packs: dict[str, tuple[list[Prepared], int]] = {}
    for one in prepared:
        study = one.record.study_instance_uid
        members, size = open_packs.get(study, ([], 0))
        if not members or size >= PACK_MAX_BYTES:
            members, size = [], 0
            packs.append(members)
        members.append(one)
        open_packs[study] = (members, size + len(one.member.data))
    return packs


def pack_instances(study: Sequence[Prepared]) -> tuple[str, Pack, list[Stored]]:
    """The pack of one study's prepared files, its key, and each file's row placed in it.

    A file whose bytes (SHA-256) are already in the pack is not packed twice: it gets the
    first one's place, and the catalog answers it as the duplicate it is."""
    key = store.pack_key_for(study[0].record.study_instance_uid)
    members: dict[str, SealedMember] = {}
    for one in study:
        members.setdefault(one.member.sha256, one.member)
    pack = build_pack(list(members.values()), study[0].member.key_id)
    where = {member.sha256: member for member in pack.members}
    stored = []
    for one in study:
        member = where[one.member.sha256]
        record = replace(
            one.record,
            object_key=key,
            byte_offset=member.offset,
            byte_length=member.length,
            bytes_stored=member.length,
        )
        stored.append(Stored(one.file_id, record, one.identity))
    return key, pack, stored


def store_pack(study: Sequence[Prepared], settings: PipelineSettings) -> list[Stored]:
    """Write one study's pack and its keys object; the files' rows (not yet committed)."""
    key, pack, stored = pack_instances(study)
    target, bucket = settings.location(settings.tier)
    try:
        # Both PUTs at once: the batch waits for one round trip to MinIO, not two.
        keys = _PUTS.submit(store.put, target, bucket, keys_key_for(key), pack.keys)
        try:
            store.put(target, bucket, key, pack.data)
        finally:
            keys_error = keys.exception()
        if keys_error is not None:
            raise keys_error
    except Exception as error:
        raise StorageError(f"{type(error).__name__}: {error}") from error
    return stored


# A thread for each pack's keys object PUT, beside the pack's own.
_PUTS = ThreadPoolExecutor(2, thread_name_prefix="strata-put")


def warm_up() -> None:
    """Load what the first file would otherwise wait for: the codecs' libraries, by one
    small image encoded and verified with each lossless codec."""
    layout = PixelLayout(
        rows=8,
        columns=8,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=12,
        pixel_representation=0,
        planar_configuration=0,
        photometric_interpretation="MONOCHROME2",
        frames=1,
        little_endian=True,
    )
    pixels = memoryview(bytes(range(128)))
    for transfer_syntax in sorted(lossless_transfer_syntaxes()):
        try:
            encode_verified(pixels, layout, transfer_syntax)
        except NotLossless:
            continue


def _gathered(item: IngestItem) -> IngestItem:
    """``item`` with the whole file in ``data``: its parts fetched from Ray's object store."""
    if not item.parts:
        return item
    parts = ray.get(list(item.parts), timeout=PARTS_TIMEOUT_S)
    data = b"".join([*parts, item.data])
    del parts
    return IngestItem(item.file_id, data, item.sha256, source=item.source)


PARTS_TIMEOUT_S = 60.0
_PARTS_LOST = (
    "the archive lost part of this file before storing it (a component restarted); nothing "
    "was committed for it, send it again"
)


class StorageError(Exception):
    """Writing a prepared object to the store failed; the file itself was fine."""


def prepare(item: IngestItem, settings: PipelineSettings) -> Prepared:
    """One file sealed as a pack member, with its catalog row (not yet placed) and its
    identity index row; no I/O but the key file."""
    data = bytes(item.data)  # already bytes in a worker: no copy
    split = split_file(data, max_dataset_bytes=settings.max_file_bytes)
    header = split.header
    codecs = settings.codecs_for(header.modality)
    manifest, segments, note = _encode(
        data, split, item.sha256, codecs, settings.fanout, settings.min_saving
    )
    if manifest.kind == "whole":
        # A split object is proven by its rebuild hash; a whole one by hashing it here.
        _check_received(data, item.sha256)

    keys = cached_key_file(settings.key_file)
    manifest = replace(
        manifest,
        sop_instance_uid=header.sop_instance_uid,
        ingest_time=datetime.now(UTC),
        storage_note=note,
        source=item.source,
    )
    member = seal_member(
        [manifest.to_bytes(), *segments],
        sha256=item.sha256,
        sop_instance_uid=header.sop_instance_uid,
        keys=keys,
    )
    record = instance_record(
        header,
        split.layout,
        manifest,
        pseudonyms=keys.pseudonymizer(),
        object_key="",
        bytes_stored=len(member.data),
        tier=settings.tier,
        key_id=member.key_id,
    )
    identity = identity_keys(keys.pseudonymizer()).row(
        item.sha256, header.study_instance_uid, header.sop_instance_uid, split.searchable()
    )
    return Prepared(item.file_id, member, record, identity)


def instance_record(
    header: InstanceHeader,
    layout: PixelLayout | None,
    manifest: Manifest,
    *,
    pseudonyms: Pseudonymizer,
    object_key: str,
    bytes_stored: int,
    tier: str,
    key_id: str,
    byte_offset: int = 0,
) -> InstanceRecord:
    """The catalog row of a stored instance (``version`` still 0), from the file's header
    and pixel layout, the member's manifest, and where and how the member is stored: bytes
    ``byte_offset`` .. ``byte_offset + bytes_stored`` of pack ``object_key``.

    Ingest and the catalog rebuild (``workers.pipeline.recover``) both build rows here, so that a
    rebuilt row is computed the way the lost one was.
    """
    if manifest.ingest_time is None:
        raise ValueError("the manifest has no ingest_time; a catalog row needs one")
    return InstanceRecord(
        sop_instance_uid=header.sop_instance_uid,
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid,
        sop_class_uid=header.sop_class_uid,
        modality=header.modality,
        body_part=header.body_part,
        study_date=header.study_date,
        patient_pseudonym=pseudonyms.pseudonym("patient_id", header.patient_id),
        accession_pseudonym=pseudonyms.pseudonym("accession_number", header.accession_number),
        transfer_syntax_in=header.transfer_syntax,
        transfer_syntax_stored=manifest.transfer_syntax_stored,
        storage_action=manifest.storage_action,
        storage_note=manifest.storage_note,
        frames=layout.frames if layout else 0,
        rows=layout.rows if layout else 0,
        columns=layout.columns if layout else 0,
        bits_allocated=layout.bits_allocated if layout else 0,
        bits_stored=layout.bits_stored if layout else 0,
        samples_per_pixel=layout.samples_per_pixel if layout else 0,
        photometric_interpretation=layout.photometric_interpretation if layout else "",
        bytes_in=manifest.original_length,
        bytes_stored=bytes_stored,
        sha256=manifest.sha256,
        object_key=object_key,
        tier=tier,
        key_id=key_id,
        ingest_time=manifest.ingest_time,
        byte_offset=byte_offset,
        byte_length=bytes_stored,
        source=manifest.source,
        manufacturer=header.manufacturer,
        model=header.model,
    )


def _encode(
    data: bytes,
    split: SplitFile,
    sha256: str,
    codecs: Sequence[str],
    fanout: FrameFanout | None = None,
    min_saving: float = MIN_SAVING,
) -> tuple[Manifest, list[bytes | memoryview], str]:
    """Choose the stored form and say why, in one sentence.

    In order: the first of ``codecs`` (the tier's choice for this modality first) that
    holds the pixel data exactly; else zstd of the file when it has native pixels and
    zstd saves at least 5 %; else the file as received. Encapsulated pixel data is never
    re-encoded: its original codestream could not be given back byte for byte.
    """
    header = split.header
    layout = split.layout
    if layout is None:
        if split.native_pixels:
            reason = "Float or Double Float Pixel Data, which no lossless image codec holds"
            return _zstd_or_whole(data, sha256, header.transfer_syntax, reason)
        if split.encapsulated:
            note = (
                f"pixel data arrived encapsulated ({syntax_name(header.transfer_syntax)}); "
                "kept as received because its codestream could not be regenerated byte for "
                "byte from decoded pixels"
            )
        elif header.transfer_syntax == DeflatedExplicitVRLittleEndian:
            note = "deflated data set, already compressed; kept as received"
        else:
            note = "no pixel data; kept as received"
        return _whole(data, sha256, header.transfer_syntax), [data], note

    view = memoryview(data)
    prefix = view[: split.pixel_start]
    pixels = memoryview(sample_bytes(data, split))
    suffix = view[split.pixel_end :]
    if not values_fit_bits_stored(pixels, layout):
        reason = (
            f"samples use bits above Bits Stored {layout.bits_stored} (overlay or stray "
            "high bits), which a compressed DICOM file would show as pixels"
        )
        return _zstd_or_whole(data, sha256, header.transfer_syntax, reason)
    refusals: list[str] = []
    spread = ""
    for transfer_syntax in codecs:
        # The proof: the file rebuilt from what is stored (prefix, every frame as decoded
        # back from its codestream, pad byte, suffix) hashes to what the front end
        # received. It also proves the bytes did not change on the way to this worker.
        rebuilt = hashlib.sha256(prefix)
        try:
            if split.pairs_swapped:
                # Frames are verified against the samples in order; the file hash is taken
                # over the value swapped back, as the file holds it.
                encoded = encode_verified(pixels, layout, transfer_syntax)
                rebuilt.update(swap_pairs(decode_to_native(encoded, layout)))
                encoded = replace(encoded, trailing=b"")
            elif fanout is not None and not refusals and fanout.applies(layout):
                encoded, tasks = fanout.encode(pixels, layout, transfer_syntax)
                # Each task proved its decoded frames equal these bytes bit for bit, so
                # hashing them is hashing the decoded frames.
                rebuilt.update(pixels[: layout.expected_length])
                spread = f", {layout.frames} frames encoded by {tasks} parallel tasks"
            else:
                encoded = encode_verified(pixels, layout, transfer_syntax, digest=rebuilt)
        except NotLossless as error:
            refusals.append(str(error))
            continue
        coded = sum(map(len, encoded.frames))
        if coded > min_saving * layout.expected_length:
            refusals.append(
                f"{syntax_name(transfer_syntax)} saved nothing on this image "
                f"({coded} bytes for {layout.expected_length})"
            )
            break  # the other codecs would not do better on so small or noisy an image
        rebuilt.update(encoded.trailing)
        rebuilt.update(suffix)
        if rebuilt.hexdigest() != sha256:
            log.error("lossless check failed for file %s", _short(sha256))
            refusals.append(f"{syntax_name(transfer_syntax)} did not rebuild the original")
            continue
        manifest = Manifest(
            kind="split",
            sha256=sha256,
            original_length=len(data),
            transfer_syntax_in=header.transfer_syntax,
            transfer_syntax_stored=encoded.transfer_syntax,
            layout=layout,
            trailing=bytes(pixels[layout.expected_length :]),
            frame_count=len(encoded.frames),
            pairs_swapped=split.pairs_swapped,
        )
        note = f"pixel data re-encoded as {syntax_name(encoded.transfer_syntax)}, verified{spread}"
        if refusals:
            note += f" ({_first(refusals)})"
        return manifest, [prefix, *encoded.frames, suffix], note
    return _zstd_or_whole(data, sha256, header.transfer_syntax, _first(refusals))


def _first(refusals: list[str]) -> str:
    """The first codec's refusal, and how many others refused too: one short sentence."""
    others = len(refusals) - 1
    return refusals[0] + (f"; {others} other codec(s) could not either" if others > 0 else "")


def _whole(data: bytes, sha256: str, transfer_syntax: str, compression: str = "") -> Manifest:
    return Manifest(
        kind="whole",
        sha256=sha256,
        original_length=len(data),
        transfer_syntax_in=transfer_syntax,
        transfer_syntax_stored=transfer_syntax,
        compression=compression,
    )


def _zstd_or_whole(
    data: bytes, sha256: str, transfer_syntax: str, reason: str
) -> tuple[Manifest, list[bytes | memoryview], str]:
    """The file zstd-compressed when that saves 5 % or more, else as received."""
    packed = bytes(imagecodecs.zstd_encode(data, level=ZSTD_LEVEL))
    if len(packed) <= MIN_SAVING * len(data) and imagecodecs.zstd_decode(packed) == data:
        saved = 100 * (1 - len(packed) / len(data))
        note = f"{reason}; stored zstd-compressed ({saved:.0f} % smaller), verified"
        return _whole(data, sha256, transfer_syntax, "zstd"), [packed], note
    return _whole(data, sha256, transfer_syntax), [data], f"{reason}; kept as received"


def _preference(transfer_syntax: str) -> int:
    """Place in the fallback order; a codec registered later and not listed comes last."""
    if transfer_syntax in _CODEC_PREFERENCE:
        return _CODEC_PREFERENCE.index(transfer_syntax)
    return len(_CODEC_PREFERENCE)


def _check_received(data: bytes, sha256: str) -> None:
    """Refuse bytes that are not the ones the front end hashed."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RejectError(
            Reason.BAD_REQUEST, "the file changed between the front end and the worker"
        )


def _short(sha256: str) -> str:
    return sha256[:12]
