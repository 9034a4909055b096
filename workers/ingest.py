"""The per-instance ingest pipeline: parse, split, encode, verify, encrypt, store.

``ingest_batch`` is what a Ray task runs: plain data in, plain data out. Which files go in
one batch, and how many batches run at once, is decided in ``cluster/dispatch.py``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom.uid import UID

from workers import store
from workers.codec import NotLossless, encode_verified, values_fit_bits_stored
from workers.envelope import seal
from workers.errors import Reason, RejectError
from workers.keys import cached_key_file
from workers.payload import Manifest
from workers.records import (
    HTJ2K_LOSSLESS,
    IngestItem,
    InstanceRecord,
    Outcome,
    Rejected,
    Stored,
    StoreSettings,
)
from workers.split import SplitFile, split_file

log = logging.getLogger("strata.workers.ingest")


@dataclass(frozen=True)
class PipelineSettings:
    """Everything a worker needs to store an instance; passed to every task."""

    store: StoreSettings
    key_file: str
    tier: str = "hot"
    transfer_syntax: str = HTJ2K_LOSSLESS


def ingest_batch(items: list[IngestItem], settings: PipelineSettings) -> list[Outcome]:
    """Store every item it can; one outcome per item, in order. One bad file never stops
    the others."""
    outcomes: list[Outcome] = []
    for item in items:
        try:
            outcomes.append(ingest_one(item, settings))
        except RejectError as error:
            outcomes.append(Rejected(item.file_id, error.reason.value, error.message))
        except Exception as error:
            log.exception("file %s failed in the pipeline", _short(item.sha256))
            outcomes.append(
                Rejected(
                    item.file_id,
                    Reason.INTERNAL.value,
                    f"the pipeline failed with {type(error).__name__}; nothing was stored "
                    "for this file and the error was logged",
                )
            )
    return outcomes


def ingest_one(item: IngestItem, settings: PipelineSettings) -> Stored:
    """Store one file and return its catalog row (not yet committed)."""
    data = item.data
    split = split_file(data)
    header = split.header
    manifest, segments, note = _encode(data, split, item.sha256, settings.transfer_syntax)

    keys = cached_key_file(settings.key_file)
    object_key = object_key_for(header.study_instance_uid, header.sop_instance_uid, item.sha256)
    blob = seal(
        [manifest.to_bytes(), *segments],
        object_key=object_key,
        sop_instance_uid=header.sop_instance_uid,
        keys=keys,
    )
    store.put(settings.store, store.tier_bucket(settings.tier), object_key, blob)

    pseudonyms = keys.pseudonymizer()
    layout = split.layout
    record = InstanceRecord(
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
        storage_action="transcoded" if manifest.kind == "split" else "as_received",
        storage_note=note,
        frames=layout.frames if layout else 0,
        rows=layout.rows if layout else 0,
        columns=layout.columns if layout else 0,
        bits_allocated=layout.bits_allocated if layout else 0,
        bits_stored=layout.bits_stored if layout else 0,
        samples_per_pixel=layout.samples_per_pixel if layout else 0,
        photometric_interpretation=layout.photometric_interpretation if layout else "",
        bytes_in=len(data),
        bytes_stored=len(blob),
        sha256=item.sha256,
        object_key=object_key,
        tier=settings.tier,
        key_id=keys.active_key_id,
        ingest_time=datetime.now(UTC),
    )
    return Stored(item.file_id, record)


def _encode(
    data: bytes, split: SplitFile, sha256: str, transfer_syntax: str
) -> tuple[Manifest, list[bytes | memoryview], str]:
    """Choose the stored form: lossless re-encode when proven exact, else as received."""
    header = split.header
    whole = Manifest(
        kind="whole",
        sha256=sha256,
        original_length=len(data),
        transfer_syntax_in=header.transfer_syntax,
        transfer_syntax_stored=header.transfer_syntax,
    )
    layout = split.layout
    if layout is None:
        _check_received(data, sha256)
        if split.encapsulated:
            note = f"pixel data already encapsulated ({_syntax_name(header.transfer_syntax)})"
        elif split.pixel_start == len(data):
            note = "no pixel data that can be split out"
        else:
            note = "pixel data layout not described"
        return whole, [data], note + "; stored as received"

    view = memoryview(data)
    prefix = view[: split.pixel_start]
    pixels = view[split.pixel_start : split.pixel_end]
    suffix = view[split.pixel_end :]
    if not values_fit_bits_stored(pixels, layout):
        _check_received(data, sha256)
        note = (
            f"samples use bits above Bits Stored {layout.bits_stored} (overlay or stray "
            "high bits): a compressed file would show other pixels"
        )
        return whole, [data], note + "; stored as received"
    # The proof: the file rebuilt from what we store (prefix, every frame as decoded back
    # from its codestream, pad byte, suffix) hashes to what the front end received. It
    # also proves the bytes did not change between the front end and this worker.
    rebuilt = hashlib.sha256(prefix)
    try:
        encoded = encode_verified(pixels, layout, transfer_syntax, digest=rebuilt)
    except NotLossless as error:
        _check_received(data, sha256)
        return whole, [data], f"{error}; stored as received"
    rebuilt.update(encoded.trailing)
    rebuilt.update(suffix)
    if rebuilt.hexdigest() != sha256:
        log.error("lossless check failed for file %s; storing as received", _short(sha256))
        return whole, [data], "re-encoded file did not hash to the original; stored as received"

    manifest = Manifest(
        kind="split",
        sha256=sha256,
        original_length=len(data),
        transfer_syntax_in=header.transfer_syntax,
        transfer_syntax_stored=encoded.transfer_syntax,
        layout=layout,
        trailing=encoded.trailing,
        frame_count=len(encoded.frames),
    )
    note = f"pixel data re-encoded as {_syntax_name(encoded.transfer_syntax)}, verified"
    return manifest, [prefix, *encoded.frames, suffix], note


def _check_received(data: bytes, sha256: str) -> None:
    """Refuse bytes that are not the ones the front end hashed."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RejectError(
            Reason.BAD_REQUEST, "the file changed between the front end and the worker"
        )


def object_key_for(study_instance_uid: str, sop_instance_uid: str, sha256: str) -> str:
    """Object key from hashes only: UIDs never appear in object names or listings.

    Content-addressed by the file's SHA-256, so a new version never overwrites an old one.
    """
    study = hashlib.sha256(study_instance_uid.encode()).hexdigest()[:24]
    instance = hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:24]
    return f"v1/{study[:2]}/{study}/{instance}/{sha256}"


def _syntax_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else f"transfer syntax {uid}"


def _short(sha256: str) -> str:
    return sha256[:12]
