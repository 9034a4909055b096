"""Plain data passed between the pipeline's stages and to the catalog.

Every type here is a frozen dataclass of builtins so that Ray can pickle it cheaply and
tests can build one by hand.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from pydicom.uid import UID

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def syntax_name(transfer_syntax: str) -> str:
    """A transfer syntax's name for sentences ("JPEG-LS Lossless Image Compression")."""
    name = UID(transfer_syntax).name
    return name if name != transfer_syntax else f"transfer syntax {transfer_syntax}"


@dataclass(frozen=True)
class IngestItem:
    """One whole file as received by a front end, with its SHA-256 (hex).

    A large file arrives in ``parts``: Ray object refs of its leading bytes, in order, put
    into Ray's object store by the front end while the rest still arrived; ``data`` is then
    only its tail. ``data`` may be the ``bytearray`` the front end assembled it in; a
    worker always sees ``bytes``.
    """

    file_id: str
    data: bytes | bytearray
    sha256: str
    parts: tuple[Any, ...] = ()
    parts_bytes: int = 0
    source: str = ""  # the door it came through (see InstanceRecord.source)

    @property
    def size(self) -> int:
        """The whole file's size in bytes."""
        return self.parts_bytes + len(self.data)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # Pickle writes bytes and bytearray inline, so Ray would first build a whole copy
        # of the file in the front end's heap, then copy that into its object store. As a
        # PickleBuffer, the bytes go out of band: Ray copies them once, straight from the
        # front end's buffer into the object store.
        data = pickle.PickleBuffer(self.data) if protocol >= 5 else bytes(self.data)
        fields = (self.file_id, data, self.sha256, self.parts, self.parts_bytes, self.source)
        return (_item, fields)


def _item(
    file_id: str,
    data: Any,
    sha256: str,
    parts: tuple[Any, ...],
    parts_bytes: int,
    source: str = "",
) -> IngestItem:
    # Out of band, ``data`` is a read-only view of Ray's object store, valid only while
    # the task's arguments are pinned: the worker takes its own copy.
    return IngestItem(file_id, bytes(data), sha256, parts, parts_bytes, source)


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance: the row of the catalog table ``instances``.

    It lives in bytes ``byte_offset`` .. ``byte_offset + byte_length`` of the pack
    ``object_key`` (docs/object-format.md); ``bytes_stored`` is that length.

    Identity attributes of the patient appear only as keyed HMAC pseudonyms; names and
    birth dates are never carried here.
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    study_date: date | None
    patient_pseudonym: str
    accession_pseudonym: str
    transfer_syntax_in: str
    transfer_syntax_stored: str
    # "transcoded" when the pixel data was re-encoded losslessly, "as_received" otherwise;
    # storage_note says why in a sentence (e.g. which layout the codec cannot represent).
    storage_action: str
    storage_note: str
    frames: int
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    samples_per_pixel: int
    photometric_interpretation: str
    bytes_in: int
    bytes_stored: int
    sha256: str
    object_key: str
    tier: str
    key_id: str
    ingest_time: datetime
    # Assigned by the catalog writer: 1 for the first file with this SOP Instance UID,
    # n + 1 for each later different file with the same UID.
    version: int = 0
    # Where in the pack its member lies (set when the pack is built).
    byte_offset: int = 0
    byte_length: int = 0
    # Where it came from: the door, and for DIMSE the calling AE title ("dimse:CT_SCANNER_1",
    # "grpc", "dicomweb"); and the equipment that made it (from its header). Not PHI.
    source: str = ""
    manufacturer: str = ""
    model: str = ""


@dataclass(frozen=True)
class Stored:
    """A file the pipeline wrote to the object store; not yet committed to the catalog."""

    file_id: str
    record: InstanceRecord
    # Its row of the identity index (workers.dicom.identity.IdentityRow); None where none
    # could be made (a row rebuilt without its file).
    identity: Any = None


@dataclass(frozen=True)
class Rejected:
    """A file the pipeline refused; nothing was written for it."""

    file_id: str
    reason: str
    message: str


Outcome = Stored | Rejected


@dataclass(frozen=True)
class StoreSettings:
    """Where the S3-compatible object store (MinIO) listens and how to sign in to it."""

    endpoint: str  # "127.0.0.1:9000", no scheme
    access_key: str
    secret_key: str = field(repr=False)  # never in a log line or a traceback's repr
    secure: bool = False
    region: str = "us-east-1"


@dataclass(frozen=True)
class TierLocation:
    """Where one tier's objects live when not in the node's own MinIO bucket
    ``strata-<tier>``: a bucket, in the same store or another S3 endpoint."""

    tier: str
    store: StoreSettings
    bucket: str
