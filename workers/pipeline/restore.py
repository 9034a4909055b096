"""Give an instance back: the original file byte for byte, or its stored compressed form.

Runs in a Ray task so that plaintext exists only inside a worker and the stream to the
client.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
import pydicom
from pydicom import uid
from pydicom.encaps import encapsulate
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from workers.codecs.lossless import (
    EncodedPixels,
    NotLossless,
    decode_to_native,
    encode_verified,
    lossless_transfer_syntaxes,
)
from workers.dicom.split import PixelLayout, sample_bytes, split_file, swap_pairs
from workers.errors import Reason, RejectError
from workers.objects import store
from workers.objects.envelope import KeyRing, keys_key_for, open_member
from workers.objects.keys import cached_key_file
from workers.objects.manifest import Manifest
from workers.pipeline.ingest import PipelineSettings
from workers.records import syntax_name


class RestoreError(Exception):
    """An object that cannot be given back as asked; the message says why."""


class TranscodeRefusedError(RestoreError):
    """The instance is intact but cannot be given in the transfer syntax asked for."""


@dataclass(frozen=True)
class RestoredFile:
    """One whole DICOM file and what it is."""

    data: bytes
    transfer_syntax: str
    sha256: str


@dataclass(frozen=True)
class ObjectRef:
    """Where an instance lives (the catalog row's address columns): bytes
    ``byte_offset`` .. ``byte_offset + byte_length`` of pack ``object_key`` in its tier's
    bucket, its data key in the pack's keys object under ``sha256``."""

    object_key: str
    sop_instance_uid: str
    tier: str
    sha256: str
    byte_offset: int
    byte_length: int

    @classmethod
    def of(cls, record: Any) -> ObjectRef:
        """The address of a catalog row (an ``InstanceRecord``)."""
        return cls(
            record.object_key,
            record.sop_instance_uid,
            record.tier,
            record.sha256,
            record.byte_offset,
            record.byte_length,
        )


def read_with_key(ref: ObjectRef, settings: PipelineSettings) -> tuple[bytes, bytes]:
    """The instance's member and its data key, the two GETs at once (a retrieval waits
    for one round trip, not two)."""
    key = READ_THREADS.submit(data_key, ref, settings)
    member = read_member(ref, settings)  # its failure is the one reported
    return member, key.result()


# Threads for the keys object's GET beside the member's (they wait on the network).
READ_THREADS = ThreadPoolExecutor(4, thread_name_prefix="strata-read")


def read_member(ref: ObjectRef, settings: PipelineSettings) -> bytes:
    """The instance's member: its byte range of the pack, in one ranged GET."""
    where, bucket = settings.location(ref.tier)
    return store.get(where, bucket, ref.object_key, ref.byte_offset, ref.byte_length)


def data_key(ref: ObjectRef, settings: PipelineSettings) -> bytes:
    """The instance's data key, from its pack's keys object, unwrapped."""
    where, bucket = settings.location(ref.tier)
    blob = store.get(where, bucket, keys_key_for(ref.object_key))
    return KeyRing.from_bytes(blob).data_key(ref.sha256, cached_key_file(settings.key_file))


def restore(ref: ObjectRef, form: str, settings: PipelineSettings) -> RestoredFile:
    """Fetch, decrypt and rebuild one instance.

    ``form`` is ``"original"`` (byte for byte, SHA-256 checked), ``"stored"`` (a valid
    DICOM file in the stored transfer syntax; the original when it was stored as received)
    or a transfer syntax UID to transcode to losslessly (see ``transcode``).
    """
    member, key = read_with_key(ref, settings)
    return rebuild(member, ref, form, key, max_bytes=settings.max_file_bytes)


@dataclass(frozen=True)
class RestoredHead:
    """What a streamed restore sends first: what the file is, before its bytes."""

    transfer_syntax: str
    total_size: int
    sha256: str


def restore_chunks(
    ref: ObjectRef, form: str, settings: PipelineSettings, chunk_size: int
) -> Iterator[RestoredHead | bytes]:
    """``restore``, streamed: a ``RestoredHead``, then the file in ``chunk_size`` pieces
    (at least one).

    Run as a Ray streaming generator, so the front end holds a few chunks of a large file
    at a time instead of the whole file (Ray's generator backpressure keeps the worker
    from running ahead of a slow client).
    """
    restored = restore(ref, form, settings)
    yield RestoredHead(restored.transfer_syntax, len(restored.data), restored.sha256)
    view = memoryview(restored.data)
    for offset in range(0, max(len(view), 1), chunk_size):  # an empty file: one empty chunk
        yield bytes(view[offset : offset + chunk_size])


def rebuild(
    member: bytes,
    ref: ObjectRef,
    form: str,
    key: bytes,
    *,
    max_bytes: int | None = None,
) -> RestoredFile:
    """Decrypt one pack member with its data key ``key`` and rebuild the file in ``form``
    (see ``restore``); a transcode whose data set would inflate or decode past
    ``max_bytes`` is refused first."""
    segments = open_member(
        member, data_key=key, sha256=ref.sha256, sop_instance_uid=ref.sop_instance_uid
    )
    manifest = Manifest.from_bytes(segments[0])
    original = _original(manifest, segments)
    stored_form = manifest.kind == "split" and form in ("stored", manifest.transfer_syntax_stored)
    if stored_form:
        data = _encapsulated_file(original, manifest, segments[2:-1])
        return _file(data, manifest.transfer_syntax_stored)
    if form in ("original", "stored", manifest.transfer_syntax_in):
        return RestoredFile(original, manifest.transfer_syntax_in, manifest.sha256)
    _refuse_if_expanding_past(original, manifest.transfer_syntax_in, max_bytes)
    return _file(transcode(original, manifest.transfer_syntax_in, form), form)


def _refuse_if_expanding_past(original: bytes, syntax_in: str, limit: int | None) -> None:
    """Refuse a transcode that would hold more than ``limit`` bytes of data set or pixels.

    A deflated data set is measured by inflating at most ``limit`` + 1 bytes of it; an
    encapsulated one by what its image attributes declare once decoded (RLE, for one,
    expands up to 64 times).
    """
    if limit is None:
        return
    try:
        split = split_file(original, max_dataset_bytes=limit)
    except RejectError as error:
        if error.reason != Reason.TOO_LARGE:
            raise
        raise TranscodeRefusedError(
            f"{error.message}; it is only given back as received (form 'original')"
        ) from None
    if not split.encapsulated:
        return
    header = pydicom.dcmread(io.BytesIO(original), stop_before_pixels=True)
    declared = (
        int(header.get("Rows", 0) or 0)
        * int(header.get("Columns", 0) or 0)
        * int(header.get("SamplesPerPixel", 1) or 1)
        * -(-int(header.get("BitsAllocated", 8) or 8) // 8)
        * int(header.get("NumberOfFrames", 1) or 1)
    )
    if declared > limit:
        raise TranscodeRefusedError(
            f"decoding this instance's pixel data would take {declared} bytes, more than the "
            f"{limit}-byte limit (max_file_bytes); retrieve it as 'original' or 'stored'"
        )


# Transfer syntaxes whose pixels are exactly what was encoded: safe to decode and
# re-encode in another lossless syntax.
LOSSLESS_INPUTS = frozenset(
    {
        *uid.UncompressedTransferSyntaxes,
        uid.DeflatedExplicitVRLittleEndian,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.RLELossless,
    }
)


# Retrieval targets written by pydicom rather than by a registered codec (so not
# ingest codecs): native little endian, whole-file deflate, and RLE with pydicom's own
# encoder.
_WRITTEN_BY_PYDICOM = frozenset(
    {uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian, uid.RLELossless}
)


def transcode_targets() -> frozenset[str]:
    """Every transfer syntax ``transcode`` writes."""
    return lossless_transfer_syntaxes() | _WRITTEN_BY_PYDICOM


def transcode(original: bytes, syntax_in: str, target: str) -> bytes:
    """The original as a valid DICOM file in ``target`` (one of ``transcode_targets``),
    its pixels verified equal to the original's. Lossy originals are refused: a
    "lossless" copy of lossy pixels would misstate what the archive holds."""
    if syntax_in not in LOSSLESS_INPUTS:
        raise TranscodeRefusedError(
            f"the instance arrived in {syntax_name(syntax_in)}, which is lossy; it is only given "
            "back as received (form 'original')"
        )
    if target not in transcode_targets():
        known = ", ".join(
            f"{syntax} ({syntax_name(syntax)})" for syntax in sorted(transcode_targets())
        )
        raise TranscodeRefusedError(
            f"transfer syntax {target!r} is not one Strata writes; it writes {known}"
        )
    native = original if syntax_in in uid.UncompressedTransferSyntaxes else None
    if native is None:
        # Decompress with pydicom's decoders; the codec re-encodes and verifies after.
        dataset = pydicom.dcmread(io.BytesIO(original))
        try:
            dataset.decompress()
        except Exception as error:  # noqa: BLE001 - pydicom raises many types here
            raise TranscodeRefusedError(
                f"{syntax_name(syntax_in)} pixel data could not be decoded ({type(error).__name__})"
            ) from None
        native = _write(dataset, uid.ExplicitVRLittleEndian)
    if target not in _WRITTEN_BY_PYDICOM:
        return transcode_native(native, target)
    little_endian = _little_endian(native)
    if target == uid.ExplicitVRLittleEndian:
        return little_endian
    if target == uid.DeflatedExplicitVRLittleEndian:
        # Deflate compresses the encoded data set as a whole: lossless by construction.
        return _write(pydicom.dcmread(io.BytesIO(little_endian)), target)
    return _rle(little_endian)


def _rle(little_endian: bytes) -> bytes:
    """An Explicit VR Little Endian file as RLE Lossless, pydicom's encoder, verified by
    decoding every frame back and comparing all bits with the original's."""
    dataset = pydicom.dcmread(io.BytesIO(little_endian))
    if "PixelData" not in dataset:
        raise TranscodeRefusedError(
            "the instance has no (7FE0,0010) Pixel Data, so there is nothing to encode as RLE"
        )
    try:
        dataset.compress(uid.RLELossless, encoding_plugin="pydicom")
    except Exception as error:  # noqa: BLE001 - pydicom raises many types here
        # pydicom's sentences name the element and the value ("(0028,0100) ...").
        sentence = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise TranscodeRefusedError(f"RLE Lossless cannot hold this image: {sentence}") from None
    data = _write(dataset, uid.RLELossless)
    # Every bit, the ones above Bits Stored too: no masking, no colour conversion.
    encoded, before = (
        pixel_array(io.BytesIO(file), raw=True, correct_unused_bits=False)
        for file in (data, little_endian)
    )
    if not np.array_equal(encoded, before):
        raise TranscodeRefusedError(
            "the RLE Lossless encoding did not decode to the original pixels bit for bit"
        )
    return data


def _little_endian(native: bytes) -> bytes:
    """A native file re-encoded as Explicit VR Little Endian, pixel bytes swapped where
    the original was big endian (pydicom writes OW values as they are)."""
    split = split_file(native)
    dataset = pydicom.dcmread(io.BytesIO(native))
    layout = split.layout
    if layout is not None and not layout.little_endian and layout.bits_allocated > 8:
        value = memoryview(native)[split.pixel_start : split.pixel_end]
        width = layout.bits_allocated // 8
        count = layout.expected_length // width
        swapped = np.frombuffer(value, dtype=f">u{width}", count=count).astype(f"<u{width}")
        dataset.PixelData = swapped.tobytes() + bytes(value[layout.expected_length :])
    elif split.pairs_swapped:
        dataset.PixelData = bytes(sample_bytes(native, split))
        dataset["PixelData"].VR = "OB"
    return _write(dataset, uid.ExplicitVRLittleEndian)


def _write(dataset: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """``dataset`` as a Part 10 file in ``transfer_syntax`` (explicit VR little endian).

    force_encoding re-encodes big-endian and implicit-VR originals as explicit VR little
    endian, which every syntax written here requires. pydicom refuses it together with
    enforce_file_format, so the preamble and file meta (read from the original Part 10
    file) are written as they are, with the group length recomputed.
    """
    dataset.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    dataset.preamble = dataset.preamble or b"\0" * 128
    dataset.file_meta.FileMetaInformationGroupLength = 0
    out = io.BytesIO()
    pydicom.dcmwrite(out, dataset, implicit_vr=False, little_endian=True, force_encoding=True)
    return out.getvalue()


def _file(data: bytes, transfer_syntax: str) -> RestoredFile:
    return RestoredFile(data, transfer_syntax, hashlib.sha256(data).hexdigest())


def _original(manifest: Manifest, segments: list[bytes]) -> bytes:
    if manifest.kind == "whole":
        data = segments[1]
        if manifest.compression == "zstd":
            data = bytes(imagecodecs.zstd_decode(data))
        elif manifest.compression:
            raise RestoreError(f"compression {manifest.compression!r} is not known")
    elif manifest.kind == "split" and manifest.layout is not None:
        encoded = EncodedPixels(
            transfer_syntax=manifest.transfer_syntax_stored,
            frames=tuple(segments[2:-1]),
            trailing=manifest.trailing,
        )
        value = decode_to_native(encoded, manifest.layout)
        if manifest.pairs_swapped:
            value = swap_pairs(value)
        data = b"".join((segments[1], value, segments[-1]))
    else:
        raise RestoreError(f"manifest kind {manifest.kind!r} is not known")
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise RestoreError("rebuilt file does not match the SHA-256 recorded at ingest")
    return data


def transcode_native(original: bytes, transfer_syntax: str) -> bytes:
    """A valid DICOM file in ``transfer_syntax`` (a lossless codec) with the pixels of an
    original whose pixel data is native; every frame is verified bit-exact on the way.

    Raises RestoreError when the original is not native or the codec cannot hold it.
    """
    split = split_file(original)
    if split.layout is None:
        raise TranscodeRefusedError(
            "only native (uncompressed) pixel data can be transcoded; this instance's is "
            f"{'encapsulated' if split.encapsulated else 'absent or not splittable'}"
        )
    pixels = sample_bytes(original, split)
    try:
        encoded = encode_verified(pixels, split.layout, transfer_syntax)
    except NotLossless as error:
        raise TranscodeRefusedError(str(error)) from None
    return _encapsulated(original, split.layout, transfer_syntax, list(encoded.frames))


def _encapsulated_file(original: bytes, manifest: Manifest, frames: list[bytes]) -> bytes:
    """The original's data set with its pixel data replaced by the stored codestreams."""
    assert manifest.layout is not None
    return _encapsulated(original, manifest.layout, manifest.transfer_syntax_stored, frames)


def _encapsulated(
    original: bytes, layout: PixelLayout, transfer_syntax: str, frames: list[bytes]
) -> bytes:
    """The original's data set with its pixel data replaced by ``frames``."""
    dataset = pydicom.dcmread(io.BytesIO(original))
    dataset.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    dataset.PixelData = encapsulate(frames, has_bot=True)
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    if layout.frames > 1 or "NumberOfFrames" in dataset:
        dataset.NumberOfFrames = layout.frames
    if layout.samples_per_pixel > 1:
        # Compressed pixel data is always colour-by-pixel (PS3.5 8.2).
        dataset.PlanarConfiguration = 0
    return _write(dataset, transfer_syntax)
