"""Give an instance back: the original file byte for byte, or its stored compressed form.

Runs in a Ray task so that plaintext exists only inside a worker and the stream to the
client.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import imagecodecs
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from workers import store
from workers.codec import EncodedPixels, NotLossless, decode_to_native, encode_verified
from workers.envelope import open_object
from workers.ingest import PipelineSettings
from workers.keys import KeyProvider, cached_key_file
from workers.payload import Manifest
from workers.split import PixelLayout, split_file


class RestoreError(Exception):
    """An object that cannot be given back as asked; the message says why."""


@dataclass(frozen=True)
class RestoredFile:
    """One whole DICOM file and what it is."""

    data: bytes
    transfer_syntax: str
    sha256: str


@dataclass(frozen=True)
class ObjectRef:
    """Where an instance's object lives (the catalog row's address columns)."""

    object_key: str
    sop_instance_uid: str
    tier: str


def restore(ref: ObjectRef, form: str, settings: PipelineSettings) -> RestoredFile:
    """Fetch, decrypt and rebuild one instance.

    ``form`` is ``"original"`` (byte for byte, SHA-256 checked) or ``"stored"`` (a valid
    DICOM file in the stored transfer syntax; the original when it was stored as received).
    """
    blob = store.get(settings.store, store.tier_bucket(ref.tier), ref.object_key)
    return rebuild(blob, ref, form, cached_key_file(settings.key_file))


def rebuild(blob: bytes, ref: ObjectRef, form: str, keys: KeyProvider) -> RestoredFile:
    """Decrypt one object and rebuild the file in ``form`` (see ``restore``)."""
    segments = open_object(
        blob, object_key=ref.object_key, sop_instance_uid=ref.sop_instance_uid, keys=keys
    )
    manifest = Manifest.from_bytes(segments[0])
    original = _original(manifest, segments)
    if form == "original" or manifest.kind == "whole":
        return RestoredFile(original, manifest.transfer_syntax_in, manifest.sha256)
    if form == "stored":
        data = _encapsulated_file(original, manifest, segments[2:-1])
        return RestoredFile(data, manifest.transfer_syntax_stored, hashlib.sha256(data).hexdigest())
    raise RestoreError(f"form {form!r} is not one of 'original', 'stored'")


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
        data = b"".join((segments[1], decode_to_native(encoded, manifest.layout), segments[-1]))
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
        raise RestoreError(
            "only native (uncompressed) pixel data can be transcoded; this instance's is "
            f"{'encapsulated' if split.encapsulated else 'absent or not splittable'}"
        )
    pixels = memoryview(original)[split.pixel_start : split.pixel_end]
    try:
        encoded = encode_verified(pixels, split.layout, transfer_syntax)
    except NotLossless as error:
        raise RestoreError(str(error)) from None
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
    out = io.BytesIO()
    # force_encoding re-encodes big-endian and implicit-VR originals as explicit VR little
    # endian, which every compressed transfer syntax requires. pydicom refuses it together
    # with enforce_file_format, so the preamble and file meta (read from the original Part
    # 10 file) are written as they are, with the group length recomputed.
    dataset.preamble = dataset.preamble or b"\0" * 128
    dataset.file_meta.FileMetaInformationGroupLength = 0
    pydicom.dcmwrite(out, dataset, implicit_vr=False, little_endian=True, force_encoding=True)
    return out.getvalue()
