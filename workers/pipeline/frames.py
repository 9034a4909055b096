"""Reading single frames of a stored instance without fetching the whole object.

A ``split`` member keeps each frame as its own encrypted segment, and its plaintext header
lists every segment's length: so a frame costs four ranged GETs (the pack's keys object,
the member's header, its manifest, the frame's segment), whatever the size of the instance
or of its pack. Members stored whole (encapsulated, zstd, as received) are read whole and
cut with pydicom.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.encaps import generate_frames

from workers.codecs.lossless import decode_frame
from workers.objects import store
from workers.objects.envelope import Opener, member_header_length, read_member_header
from workers.objects.manifest import Manifest
from workers.pipeline.ingest import PipelineSettings
from workers.pipeline.restore import (
    READ_THREADS,
    ObjectRef,
    RestoreError,
    data_key,
    read_member,
    rebuild,
)

# One GET usually holds the preamble and the whole header (~40 bytes per segment).
_FIRST_READ = 64 * 1024


class NoSuchFrameError(ValueError):
    """A frame number outside 1..Number of Frames."""


@dataclass(frozen=True)
class FrameData:
    """One frame: its codestream in ``transfer_syntax``, or native little-endian bytes
    (``transfer_syntax`` Explicit VR Little Endian) when decoded."""

    number: int  # 1-based, as in DICOM
    data: bytes
    transfer_syntax: str
    bytes_read: int  # fetched from the object store for this frame


def read_frames(
    ref: ObjectRef, numbers: list[int], settings: PipelineSettings, decoded: bool
) -> list[FrameData]:
    """Frames ``numbers`` (1-based) of one instance, in the order asked."""
    pending_key = READ_THREADS.submit(data_key, ref, settings)  # beside the member's first GET
    first = _member_range(settings, ref, 0, min(_FIRST_READ, ref.byte_length))
    key = pending_key.result()
    needed = member_header_length(first)
    if needed > len(first):
        first = _member_range(settings, ref, 0, needed)
    header = read_member_header(first)
    opener = Opener(header, data_key=key, sha256=ref.sha256, sop_instance_uid=ref.sop_instance_uid)
    start, length = header.segment_range(0)
    manifest = Manifest.from_bytes(opener.segment(0, _member_range(settings, ref, start, length)))
    overhead = len(first) + length
    if manifest.kind != "split" or manifest.layout is None:
        return _from_whole(ref, numbers, settings, decoded, key)
    out = []
    for number in numbers:
        if not 1 <= number <= manifest.frame_count:
            raise NoSuchFrameError(
                f"frame {number} does not exist; frames are 1..{manifest.frame_count}"
            )
        index = manifest.frame_segment(number - 1)
        start, length = header.segment_range(index)
        codestream = opener.segment(index, _member_range(settings, ref, start, length))
        data, syntax = codestream, manifest.transfer_syntax_stored
        if decoded:
            frame = decode_frame(codestream, manifest.layout, manifest.transfer_syntax_stored)
            data, syntax = _little_endian_bytes(frame), pydicom.uid.ExplicitVRLittleEndian
        out.append(FrameData(number, data, syntax, length + overhead))
        overhead = 0
    return out


def _member_range(settings: PipelineSettings, ref: ObjectRef, start: int, length: int) -> bytes:
    """``length`` bytes from ``start`` within the instance's member (never past its end)."""
    if start + length > ref.byte_length:
        raise RestoreError("the member's header describes bytes past its end")
    where, bucket = settings.location(ref.tier)
    return store.get(where, bucket, ref.object_key, ref.byte_offset + start, length)


def _from_whole(
    ref: ObjectRef, numbers: list[int], settings: PipelineSettings, decoded: bool, key: bytes
) -> list[FrameData]:
    member = read_member(ref, settings)
    original = rebuild(member, ref, "original", key).data
    dataset = pydicom.dcmread(io.BytesIO(original))
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    syntax = dataset.file_meta.TransferSyntaxUID
    for number in numbers:
        if not 1 <= number <= count:
            raise NoSuchFrameError(f"frame {number} does not exist; frames are 1..{count}")
    if decoded or not syntax.is_encapsulated:
        array = dataset.pixel_array
        if count == 1:  # pydicom adds a frame axis only for several frames
            array = array[np.newaxis]
        frames = [_little_endian_bytes(array[n - 1]) for n in numbers]
        syntax_out = pydicom.uid.ExplicitVRLittleEndian
    else:
        fragments = list(generate_frames(dataset.PixelData, number_of_frames=count))
        frames = [fragments[n - 1] for n in numbers]
        syntax_out = syntax
    return [
        FrameData(n, data, syntax_out, len(member) if i == 0 else 0)
        for i, (n, data) in enumerate(zip(numbers, frames, strict=True))
    ]


def _little_endian_bytes(frame: np.ndarray) -> bytes:
    return np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<")).tobytes()
