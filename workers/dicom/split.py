"""Split a DICOM Part 10 file into prefix | Pixel Data value | suffix, without decoding pixels.

``split_file`` promises ``data[:pixel_start] + data[pixel_start:pixel_end] +
data[pixel_end:] == data`` and that the middle part is exactly the value of the top-level
Pixel Data (7FE0,0010). Two readers look at every file:

- pydicom (``dcmread(force=False)``) decides what is DICOM at all and supplies the values
  of the few attributes the pipeline needs;
- a small structural walk over the bytes (``_Walk``) finds where every top-level element
  starts and ends. pydicom tolerates truncation silently in several places (a short read
  of the last value, a partial element header at the end, a missing sequence delimiter
  only warns), so the walk is what guarantees that a truncated file is rejected.

Neither reader decodes pixels, and no value of a patient attribute is ever put into an
exception or a log line.
"""

from __future__ import annotations

import datetime
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from io import BytesIO

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_description, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, TEXT_VR_DELIMS, VR

from workers.dicom.identity import SEALED_TAGS, attributes_in
from workers.errors import Reason, RejectError

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN}
)
# Photometric interpretations whose native form holds two samples per pixel on average
# (chroma subsampled horizontally by two).
SUBSAMPLED_422 = frozenset({"YBR_FULL_422", "YBR_PARTIAL_422"})

_PIXEL_DATA = 0x7FE00010
# Pixel Data, Float Pixel Data, Double Float Pixel Data, Pixel Data Provider URL (JPIP)
_FLOAT_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009})
_PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009, 0x00287FE0})
_IMAGE_PIXEL_TAGS = frozenset({0x00280010, 0x00280011, 0x00280100})
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: not a composite instance
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE_AND_PREFIX = 132

# An IS value pydicom would read as an integer: ASCII digits only (str.isdigit() also
# takes "²"), and few enough of them that int() and str() cannot refuse the number.
_INTEGER_STRING = re.compile(r"([+-]?)0*([0-9]{1,12})")

_ENCODED_VRS = frozenset(vr.value.encode("ascii") for vr in VR)
_LONG_LENGTH_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)

# The attributes split_file reads with pydicom; pydicom skips every other element
# without reading its value.
_HEADER_TAGS = [
    0x00080005,  # Specific Character Set
    0x00080016,  # SOP Class UID
    0x00080018,  # SOP Instance UID
    0x00080020,  # Study Date
    0x00080050,  # Accession Number
    0x00080060,  # Modality
    0x00080070,  # Manufacturer
    0x00081090,  # Manufacturer's Model Name
    0x00100010,  # Patient's Name
    0x00100020,  # Patient ID
    0x00180015,  # Body Part Examined
    0x0020000D,  # Study Instance UID
    0x0020000E,  # Series Instance UID
    0x00280002,  # Samples per Pixel
    0x00280004,  # Photometric Interpretation
    0x00280006,  # Planar Configuration
    0x00280008,  # Number of Frames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280100,  # Bits Allocated
    0x00280101,  # Bits Stored
    0x00280103,  # Pixel Representation
]
# Read with them: what the identity index seals (``SplitFile.searchable``).
_READ_TAGS = sorted({*_HEADER_TAGS, *SEALED_TAGS})


@dataclass(frozen=True)
class PixelLayout:
    """How native (uncompressed) Pixel Data is laid out, as the data set declares it."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int  # 0 unsigned, 1 two's complement
    planar_configuration: int  # 0 or 1 (0 when samples_per_pixel == 1)
    photometric_interpretation: str
    frames: int
    little_endian: bool

    @property
    def stored_samples_per_pixel(self) -> int:
        """Samples stored per pixel: 2 for native YBR_*_422 (chroma shared by pixel pairs)."""
        if self.samples_per_pixel == 3 and self.photometric_interpretation in SUBSAMPLED_422:
            return 2
        return self.samples_per_pixel

    @property
    def frame_bits(self) -> int:
        """Bits of one frame; frames of Bits Allocated 1 are packed without byte alignment."""
        return self.rows * self.columns * self.stored_samples_per_pixel * self.bits_allocated

    @property
    def frame_length(self) -> int:
        """Bytes of one frame (rounded up when a 1-bit frame does not fill its last byte)."""
        return -(-self.frame_bits // 8)

    @property
    def expected_length(self) -> int:
        """Bytes of all frames, without the trailing pad byte of an odd-length value."""
        return -(-(self.frame_bits * self.frames) // 8)


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that the pipeline needs; holds PHI in memory only."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str
    study_date: datetime.date | None  # None when absent or not a valid DA
    patient_id: str  # PHI: never logged or put in exception text
    accession_number: str  # PHI likewise
    patient_name: str  # PHI likewise
    transfer_syntax: str  # UID from the file meta information; "" when absent
    manufacturer: str = ""  # (0008,0070), of the equipment: not PHI
    model: str = ""  # (0008,1090) Manufacturer's Model Name


@dataclass(frozen=True)
class SplitFile:
    """A file cut around its top-level Pixel Data value.

    For native Pixel Data (Implicit VR Little Endian, Explicit VR Little or Big Endian,
    defined length) the middle part ``data[pixel_start:pixel_end]`` is the value and
    ``layout`` describes it. For encapsulated Pixel Data (undefined length) the middle
    part is the whole value: the Basic Offset Table item, every fragment item and the
    closing Sequence Delimitation Item (FFFE,E0DD); ``layout`` is None. ``layout`` is
    also None for native 8-bit Pixel Data encoded as OW in Explicit VR Big Endian, whose
    sample pairs are byte-swapped in a way PixelLayout cannot describe. When there is no
    top-level Pixel Data, or the data set is deflated and so cannot be cut,
    ``pixel_start == pixel_end == len(data)``.
    """

    header: InstanceHeader
    pixel_start: int
    pixel_end: int
    layout: PixelLayout | None
    encapsulated: bool
    # Uncompressed pixels of any kind are in the file (native Pixel Data, also when no
    # layout describes it, or Float / Double Float Pixel Data): worth compressing.
    native_pixels: bool = False
    # 8-bit samples in an OW value of a big-endian file: every byte pair is swapped, and
    # ``layout`` describes the value as ``sample_bytes`` returns it (samples in order).
    pairs_swapped: bool = False
    # The data set as pydicom read it (the header's tags and the identity index's):
    # ``searchable`` converts those values only if asked. PHI: in memory only.
    dataset: Dataset | None = field(default=None, repr=False, compare=False)

    def searchable(self) -> dict[str, str]:
        """The identity index's attributes of the file (``identity.attributes_of``), from
        the data set read once for the header: reading the file again for them cost
        ingest about 1 ms a CT slice."""
        return attributes_in(self.dataset) if self.dataset is not None else {}


def sample_bytes(data: bytes | memoryview, split: SplitFile) -> bytes | memoryview:
    """The Pixel Data value with its samples in order (undoing the pair swap of 8-bit OW
    big endian); otherwise the value as it is in the file."""
    value = memoryview(data)[split.pixel_start : split.pixel_end]
    return swap_pairs(value) if split.pairs_swapped else value


def swap_pairs(value: bytes | memoryview) -> bytes:
    """Swap the bytes of every 16-bit word (its own inverse)."""
    return np.frombuffer(value, dtype=">u2").astype("<u2").tobytes()


def split_file(data: bytes, *, max_dataset_bytes: int | None = None) -> SplitFile:
    """Return ``data`` split around its top-level Pixel Data value, or raise RejectError.

    Rejects with NOT_DICOM what pydicom refuses to read (and data sets whose structure
    cannot be walked), TRUNCATED when the file ends inside an element, a sequence or the
    encapsulated Pixel Data, or visibly between two elements (``_check_not_cut_before_uids``,
    ``_check_image_has_pixel_data``),
    MISSING_UID without SOP Instance UID or Study Instance UID, and PIXEL_LENGTH_MISMATCH
    when native Pixel Data does not have the length its Image Pixel attributes declare.

    ``max_dataset_bytes`` (the ``max_file_bytes`` setting; None: no limit) bounds the data
    set as it is read: TOO_LARGE when it is longer, and for a deflated file (Deflated
    Explicit VR Little Endian) as soon as inflating it would pass the limit, so that no
    more than ``max_dataset_bytes + 1`` bytes are ever inflated.
    """
    if max_dataset_bytes is not None and max_dataset_bytes < 0:
        raise ValueError(f"max_dataset_bytes must not be negative, not {max_dataset_bytes}")
    if len(data) < _PREAMBLE_AND_PREFIX or data[128:132] != b"DICM":
        # The same test pydicom's dcmread(force=False) applies before anything else.
        raise RejectError(
            Reason.NOT_DICOM,
            "the file has no 'DICM' prefix after a 128-byte preamble, "
            "so it is not a DICOM Part 10 file",
        )
    structure = _walk_file(data, max_dataset_bytes)
    _check_not_cut_before_uids(structure)
    attributes = _Attributes(data, structure)
    header = _header(attributes, structure.transfer_syntax)
    _check_image_has_pixel_data(structure, header.sop_class_uid)

    pixel = structure.pixel_data
    read = attributes.dataset
    if structure.deflated:
        return SplitFile(header, len(data), len(data), None, encapsulated=False, dataset=read)
    if pixel is None:
        floats = bool(structure.top_level_tags & _FLOAT_PIXEL_DATA_TAGS)
        return SplitFile(
            header,
            len(data),
            len(data),
            None,
            encapsulated=False,
            native_pixels=floats,
            dataset=read,
        )
    layout = None
    if not pixel.undefined_length and structure.transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
        layout = _layout(attributes, little_endian=structure.little_endian)
        _check_pixel_length(pixel.end - pixel.start, layout)
        if not layout.little_endian and layout.bits_allocated == 8 and pixel.vr == b"OW":
            # Big endian OW stores 8-bit samples in byte-swapped pairs (the pad byte
            # included): ``sample_bytes`` undoes that, and the layout describes the result.
            return SplitFile(
                header,
                pixel.start,
                pixel.end,
                replace(layout, little_endian=True),
                encapsulated=False,
                native_pixels=True,
                pairs_swapped=True,
                dataset=read,
            )
    return SplitFile(
        header,
        pixel.start,
        pixel.end,
        layout,
        encapsulated=pixel.undefined_length,
        native_pixels=not pixel.undefined_length,
        dataset=read,
    )


def prefix_header(prefix: bytes) -> InstanceHeader:
    """The header of a stored file from its prefix (``data[:pixel_start]`` of a file whose
    native Pixel Data was split off), read as ``split_file`` reads the whole file.

    The prefix ends with the Pixel Data element's 4-byte value length (in explicit and
    implicit VR alike): declared empty, the prefix is a complete data set. Nothing is
    checked but what the header needs; the file was checked when it was stored.
    """
    if len(prefix) < _PREAMBLE_AND_PREFIX + 4:
        raise RejectError(Reason.TRUNCATED, "the prefix is too short to hold a DICOM header")
    data = prefix[:-4] + bytes(4)
    structure = _walk_file(data, None)
    return _header(_Attributes(data, structure), structure.transfer_syntax)


# --- structure --------------------------------------------------------------------------


class _TruncatedError(Exception):
    """The file ends inside an element; the message names which."""


class _MalformedError(Exception):
    """The bytes cannot be walked as DICOM elements; the message says where."""


@dataclass(frozen=True)
class _PixelData:
    start: int
    end: int
    undefined_length: bool
    vr: bytes | None  # None when implicit VR


@dataclass(frozen=True)
class _Structure:
    transfer_syntax: str
    media_storage_sop_class: str  # (0002,0002), "" when absent
    media_storage_sop_instance: str  # (0002,0003), "" when absent
    little_endian: bool
    deflated: bool
    # the bytes the data set is read from: the file, or the inflated data set
    dataset_bytes: bytes | bytearray
    top_level_tags: frozenset[int]
    pixel_data: _PixelData | None


def _element_name(tag: int) -> str:
    """'(0010,0010) Patient's Name' — the tag and, when public, its name (never a value)."""
    label = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    try:
        return f"{label} {dictionary_description(tag)}"
    except KeyError:
        return label


def _walk_file(data: bytes, max_dataset_bytes: int | None) -> _Structure:
    """Walk preamble, file meta information and data set; raise RejectError on failure."""
    try:
        return _walk_file_or_raise(data, max_dataset_bytes)
    except _TruncatedError as error:
        raise RejectError(Reason.TRUNCATED, str(error)) from None
    except _MalformedError as error:
        raise RejectError(Reason.NOT_DICOM, str(error)) from None
    except RecursionError:
        raise RejectError(
            Reason.NOT_DICOM, "the data set nests sequences too deeply to be read"
        ) from None


def _walk_file_or_raise(data: bytes, max_dataset_bytes: int | None) -> _Structure:
    walk = _Walk(data, little_endian=True)
    # File meta information: explicit VR little endian, unless its first element says
    # otherwise (pydicom then reads it as implicit VR, and so do we).
    position = _PREAMBLE_AND_PREFIX
    meta: dict[int, bytes] = {}
    meta_declared_end = None
    if walk.group_at(position) == 0x0002:
        implicit = walk.looks_implicit(position, assumed=False)
        for tag, _, value_start, value_end, _ in walk.elements(position, implicit, while_group=2):
            meta[tag] = data[value_start:value_end]
            if tag == 0x00020000 and value_end - value_start == 4:
                meta_declared_end = value_end + struct.unpack_from("<L", data, value_start)[0]
            position = value_end
    if meta_declared_end is not None and position == len(data) < meta_declared_end:
        raise _TruncatedError(
            "the file ends inside the File Meta Information, "
            f"{meta_declared_end - position} bytes short of the length that "
            "(0002,0000) File Meta Information Group Length declares"
        )
    transfer_syntax = meta.get(0x00020010, b"").decode("latin-1").strip("\0 ")

    # An optional command set (group 0000) is implicit VR little endian for pydicom.
    if walk.group_at(position) == 0x0000:
        implicit = walk.looks_implicit(position, assumed=True)
        for _, _, _, value_end, _ in walk.elements(position, implicit, while_group=0x0000):
            position = value_end

    deflated = transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    if deflated:
        walk = _Walk(_inflate(data, position, max_dataset_bytes), little_endian=True)
        position = 0
        implicit, little_endian = False, True
    else:
        if max_dataset_bytes is not None and len(data) - position > max_dataset_bytes:
            raise RejectError(
                Reason.TOO_LARGE,
                f"the data set has {len(data) - position} bytes, more than the "
                f"{max_dataset_bytes}-byte limit (max_file_bytes); {_SMALLER_PARTS}",
            )
        implicit, little_endian = _dataset_encoding(data, position, transfer_syntax)
        walk = _Walk(data, little_endian=little_endian)

    if position < len(walk.data):
        # pydicom checks the first element's VR and follows what it finds.
        implicit = walk.looks_implicit(position, assumed=implicit)
    top_level_tags = set()
    pixel_data = None
    for tag, vr, value_start, value_end, undefined_length in walk.elements(position, implicit):
        top_level_tags.add(tag)
        if tag == _PIXEL_DATA:
            pixel_data = _PixelData(value_start, value_end, undefined_length, vr)
    return _Structure(
        transfer_syntax=transfer_syntax,
        media_storage_sop_class=meta.get(0x00020002, b"").decode("latin-1").strip("\0 "),
        media_storage_sop_instance=meta.get(0x00020003, b"").decode("latin-1").strip("\0 "),
        little_endian=little_endian,
        deflated=deflated,
        dataset_bytes=walk.data,
        top_level_tags=frozenset(top_level_tags),
        pixel_data=pixel_data,
    )


def _dataset_encoding(data: bytes, position: int, transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the data set, decided the way pydicom decides it."""
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        return True, True
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        return False, False
    if transfer_syntax or len(data) - position < 6:
        # Every other transfer syntax, encapsulated ones included, is explicit VR
        # little endian.
        return False, True
    # No Transfer Syntax UID: a valid VR in the first element means explicit VR, and a
    # big group number read as little endian means big endian.
    group, _, vr = struct.unpack_from("<HH2s", data, position)
    if vr in _ENCODED_VRS:
        return False, group < 1024
    return True, True


# What a sender can do about a data set over the limit.
_SMALLER_PARTS = (
    "send the instance in smaller parts (e.g. fewer frames per instance) "
    "or ask the archive administrator to raise max_file_bytes"
)
# Inflate in steps: at most this many bytes out per step, so that the result grows in
# place (a bytearray; one unbounded decompress() call briefly holds its output twice) ...
_INFLATE_OUTPUT_STEP = 1 << 20
# ... and at most this many deflated bytes in, since zlib copies the input a step leaves
# unused.
_INFLATE_INPUT_STEP = 1 << 16


def _inflate(data: bytes, position: int, max_bytes: int | None) -> bytearray:
    """The data set of a deflated file; TRUNCATED when the deflate stream is cut short.

    TOO_LARGE as soon as it would grow past ``max_bytes``: never more than
    ``max_bytes + 1`` bytes are inflated, however much the stream would give.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    deflated = memoryview(data)[position:]  # slices of it are not copies
    offset = 0
    unused: bytes | memoryview = b""
    inflated = bytearray()
    try:
        while not inflater.eof:
            if not unused and offset < len(deflated):
                unused = deflated[offset : offset + _INFLATE_INPUT_STEP]
                offset += len(unused)
            room = _INFLATE_OUTPUT_STEP
            if max_bytes is not None:
                room = min(room, max_bytes + 1 - len(inflated))
            step = inflater.decompress(unused, room)
            unused = inflater.unconsumed_tail
            if not step and not unused and offset == len(deflated):
                break  # every byte used and nothing more comes out: cut short
            inflated += step
            if max_bytes is not None and len(inflated) > max_bytes:
                raise RejectError(
                    Reason.TOO_LARGE,
                    f"the deflated data set inflates past the {max_bytes}-byte limit "
                    f"(max_file_bytes), so it was not inflated further; {_SMALLER_PARTS}",
                )
    except zlib.error:
        raise _MalformedError(
            "the data set of this Deflated Explicit VR Little Endian file is not a valid "
            "deflate stream"
        ) from None
    if not inflater.eof:
        raise _TruncatedError(
            "the file ends before the end of its deflated data set (Deflated Explicit VR "
            "Little Endian)"
        )
    return inflated


class _Walk:
    """Finds where elements start and end, following pydicom's reading rules.

    Values are never decoded; undefined-length values are followed item by item, and
    items of undefined length are walked as nested data sets.
    """

    def __init__(self, data: bytes | bytearray, *, little_endian: bool) -> None:
        self.data = data
        self.size = len(data)
        order = "<" if little_endian else ">"
        self.tag = struct.Struct(order + "HH")
        self.tag_and_length = struct.Struct(order + "HHL")
        self.explicit_header = struct.Struct(order + "HH2sH")
        self.long_length = struct.Struct(order + "L")

    def group_at(self, position: int) -> int | None:
        """The group number of the tag at ``position``, or None at the end of the file."""
        if position + 2 > self.size:
            return None
        group: int = struct.unpack_from("<H", self.data, position)[0]
        return group

    def looks_implicit(self, position: int, *, assumed: bool) -> bool:
        """Whether the element at ``position`` is implicit VR (pydicom's VR heuristic)."""
        if position + 6 > self.size:
            return assumed
        first, second = self.data[position + 4], self.data[position + 5]
        return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)

    def elements(
        self, position: int, implicit: bool, *, while_group: int | None = None
    ) -> Iterable[tuple[int, bytes | None, int, int, bool]]:
        """Yield (tag, VR, value start, value end, undefined length) to the end of the data.

        With ``while_group`` stop before the first element of another group.
        """
        while position < self.size:
            if while_group is not None and self.group_at(position) != while_group:
                return
            tag, vr, length, value_start = self.header(position, implicit)
            if length == _UNDEFINED_LENGTH:
                value_end = self.undefined_length_value(tag, vr, value_start, implicit)
                yield tag, vr, value_start, value_end, True
            else:
                value_end = self.defined_length_value(tag, position, length, value_start)
                yield tag, vr, value_start, value_end, False
            position = value_end

    def header(self, position: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None when implicit, length, value start) of the element header."""
        if position + 8 > self.size:
            raise _TruncatedError(
                f"the file ends inside the header of the element at byte {position}"
            )
        if implicit:
            group, element, length = self.tag_and_length.unpack_from(self.data, position)
            return group << 16 | element, None, length, position + 8
        group, element, vr, length = self.explicit_header.unpack_from(self.data, position)
        tag = group << 16 | element
        if vr in _ENCODED_VRS:
            if vr in _LONG_LENGTH_VRS:
                if position + 12 > self.size:
                    raise _TruncatedError(
                        f"the file ends inside the header of {_element_name(tag)} "
                        f"at byte {position}"
                    )
                (length,) = self.long_length.unpack_from(self.data, position + 8)
                return tag, vr, length, position + 12
            return tag, vr, length, position + 8
        if not b"AA" <= vr <= b"ZZ" and pydicom_config.assume_implicit_vr_switch:
            # Some writers switch to implicit VR mid-stream; pydicom follows them.
            group, element, length = self.tag_and_length.unpack_from(self.data, position)
            return tag, None, length, position + 8
        return tag, vr, length, position + 8

    def defined_length_value(self, tag: int, position: int, length: int, start: int) -> int:
        end = start + length
        if end > self.size:
            raise _TruncatedError(
                f"{_element_name(tag)} at byte {position} declares a {length}-byte value "
                f"but the file ends {self.size - start} bytes into it"
            )
        return end

    def undefined_length_value(self, tag: int, vr: bytes | None, start: int, implicit: bool) -> int:
        """The position just past the Sequence Delimitation Item closing the value."""
        sequence = self.is_sequence(tag, vr, start)
        position = start
        while True:
            if position + 8 > self.size:
                raise _TruncatedError(
                    f"{_element_name(tag)} has undefined length but the file ends before "
                    "its Sequence Delimitation Item (FFFE,E0DD)"
                )
            group, element, length = self.tag_and_length.unpack_from(self.data, position)
            item_tag = group << 16 | element
            if item_tag == _SEQUENCE_DELIMITER:
                return position + 8
            if item_tag != _ITEM and not sequence:
                # Not encapsulated items: pydicom then scans for the delimiter bytes.
                return self.scan_for_delimiter(tag, start)
            if length == _UNDEFINED_LENGTH:
                if not sequence:
                    return self.scan_for_delimiter(tag, start)
                position = self.item_dataset(tag, position + 8, implicit)
            else:
                if position + 8 + length > self.size:
                    raise _TruncatedError(
                        f"an item of {_element_name(tag)} at byte {position} declares "
                        f"{length} bytes but the file ends "
                        f"{self.size - position - 8} bytes into it"
                    )
                position += 8 + length

    def is_sequence(self, tag: int, vr: bytes | None, start: int) -> bool:
        if vr is not None:
            return vr == b"SQ" or (vr == b"UN" and pydicom_config.settings.infer_sq_for_un_vr)
        try:
            return dictionary_VR(tag) == "SQ"
        except KeyError:
            # pydicom peeks: an unknown undefined-length element starting with an item
            # is a sequence.
            if start + 4 > self.size:
                return False
            group, element = self.tag.unpack_from(self.data, start)
            return bool(group << 16 | element == _ITEM)

    def item_dataset(self, tag: int, position: int, implicit: bool) -> int:
        """Walk the data set of an undefined-length item; return the end of its delimiter."""
        # Items may be implicit VR inside an explicit VR data set, never the reverse.
        implicit = implicit or self.looks_implicit(position, assumed=False)
        while position + 8 <= self.size:
            group, element = self.tag.unpack_from(self.data, position)
            if group << 16 | element == _ITEM_DELIMITER:
                return position + 8
            element_tag, vr, length, value_start = self.header(position, implicit)
            if length == _UNDEFINED_LENGTH:
                position = self.undefined_length_value(element_tag, vr, value_start, implicit)
            else:
                position = self.defined_length_value(element_tag, position, length, value_start)
        raise _TruncatedError(
            f"an item of {_element_name(tag)} has undefined length but the file ends "
            "before its Item Delimitation Item (FFFE,E00D)"
        )

    def scan_for_delimiter(self, tag: int, start: int) -> int:
        delimiter = self.tag.pack(0xFFFE, 0xE0DD)
        found = self.data.find(delimiter, start)
        if found < 0 or found + 8 > self.size:
            raise _TruncatedError(
                f"{_element_name(tag)} has undefined length but the file ends before "
                "its Sequence Delimitation Item (FFFE,E0DD)"
            )
        return found + 8


def _check_not_cut_before_uids(structure: _Structure) -> None:
    """TRUNCATED when the data set is empty or stops before the place of its UIDs.

    A file cut exactly between two top-level elements is itself well formed, but
    elements are in ascending tag order: a Part 10 instance (its file meta information
    names it in (0002,0003)) whose last element comes before (0008,0018) SOP Instance UID
    or (0020,000D) Study Instance UID was cut there.
    """
    tags = structure.top_level_tags
    if not tags:
        raise RejectError(
            Reason.TRUNCATED, "the file ends before the first element of its data set"
        )
    if structure.media_storage_sop_class == _MEDIA_STORAGE_DIRECTORY:
        return
    if not structure.media_storage_sop_instance:
        return
    for tag in (0x00080018, 0x0020000D):
        if max(tags) < tag:
            raise RejectError(
                Reason.TRUNCATED,
                f"the data set ends with {_element_name(max(tags))} before "
                f"{_element_name(tag)}; the file probably ends early",
            )


def _check_image_has_pixel_data(structure: _Structure, sop_class: str) -> None:
    """TRUNCATED for an image whose data set ends before its Pixel Data.

    The SOP Class is taken from the file meta information first, so that a cut anywhere
    in the data set is caught. A non-image cut after the UIDs carries no such clue and
    cannot be told from a complete file.
    """
    tags = structure.top_level_tags
    if tags & _PIXEL_DATA_TAGS:
        return
    sop_class = structure.media_storage_sop_class or sop_class
    sop_class_name = UID(sop_class).name if sop_class else ""
    if "Image Storage" in sop_class_name:
        raise RejectError(
            Reason.TRUNCATED,
            f"the data set has no (7FE0,0010) Pixel Data although its SOP Class is "
            f"{sop_class_name}; the file probably ends early",
        )
    if tags >= _IMAGE_PIXEL_TAGS:
        raise RejectError(
            Reason.TRUNCATED,
            "the data set has no (7FE0,0010) Pixel Data although it has (0028,0010) Rows, "
            "(0028,0011) Columns and (0028,0100) Bits Allocated; the file probably ends early",
        )


# --- attributes -------------------------------------------------------------------------


class _Attributes:
    """The header attributes as pydicom read them, decoded without pydicom's validation.

    pydicom's validating converters quote an invalid value in their warning; patient
    attributes may be PHI, so text values are decoded here from the raw bytes instead.
    """

    def __init__(self, data: bytes, structure: _Structure) -> None:
        try:
            # specific_tags makes pydicom seek past every other value; defer_size keeps it
            # from copying the undefined-length ones (encapsulated Pixel Data) it walks.
            self.dataset = pydicom.dcmread(
                BytesIO(data), defer_size=4096, force=False, specific_tags=_READ_TAGS
            )
        except InvalidDicomError:
            raise RejectError(
                Reason.NOT_DICOM, "pydicom does not recognise the file as DICOM Part 10"
            ) from None
        except Exception as error:  # noqa: BLE001 - pydicom raises many types on bad input
            raise RejectError(
                Reason.NOT_DICOM, f"pydicom cannot read the data set ({type(error).__name__})"
            ) from None
        # pydicom's positions refer to the inflated data set when the file is deflated.
        self.source = structure.dataset_bytes
        self.unsigned_short = "<H" if structure.little_endian else ">H"
        # pydicom has already decoded Specific Character Set: it needs it to read on.
        character_set = self.dataset.get(0x00080005)
        self.encodings = convert_encodings(character_set.value if character_set else None)

    def raw(self, tag: int) -> bytes:
        """The undecoded value bytes of ``tag`` (b"" when absent)."""
        element = self.dataset.get_item(tag, keep_deferred=True)
        if element is None:
            return b""
        value = element.value
        if value is None and isinstance(element, RawDataElement):
            # Deferred (longer than defer_size): read it from where pydicom saw it.
            return bytes(self.source[element.value_tell : element.value_tell + element.length])
        return value if isinstance(value, bytes) else b""

    def ascii(self, tag: int) -> str:
        """A UI, CS or DA value: single-byte text without padding."""
        return self.raw(tag).decode("latin-1").strip("\0 ")

    def text(self, tag: int) -> str:
        """An SH, LO or PN value decoded with the data set's Specific Character Set."""
        value = self.raw(tag)
        return decode_bytes(value, self.encodings, TEXT_VR_DELIMS).strip("\0 ") if value else ""

    def integer(self, tag: int) -> int | None:
        """The first value of a US attribute, or of (0028,0008) Number of Frames (IS).

        None when absent or empty. Decoded here rather than by pydicom, whose validation
        warning would quote the value.
        """
        value = self.raw(tag)
        if not value:
            return None
        if tag == 0x00280008:  # Number of Frames, IS
            text = value.decode("latin-1").split("\\")[0].strip("\0 ")
            if not text:
                return None
            match = _INTEGER_STRING.fullmatch(text)
            if match is None:
                raise RejectError(
                    Reason.PIXEL_LENGTH_MISMATCH,
                    f"{_element_name(tag)} is not an integer of at most 12 digits (VR IS), "
                    "so the length of (7FE0,0010) Pixel Data cannot be checked",
                )
            sign, digits = match.groups()
            return -int(digits) if sign == "-" else int(digits)
        if len(value) >= 2:
            number: int = struct.unpack_from(self.unsigned_short, value)[0]
            return number
        raise RejectError(
            Reason.PIXEL_LENGTH_MISMATCH,
            f"{_element_name(tag)} is not an integer, so the length of (7FE0,0010) "
            "Pixel Data cannot be checked",
        )

    def required_integer(self, tag: int) -> int:
        value = self.integer(tag)
        if value is None:
            raise RejectError(
                Reason.PIXEL_LENGTH_MISMATCH,
                f"{_element_name(tag)} is missing, so the length of native (7FE0,0010) "
                "Pixel Data cannot be checked",
            )
        return value

    def optional_integer(self, tag: int, *, default: int) -> int:
        value = self.integer(tag)
        return default if value is None else value


def _header(attributes: _Attributes, transfer_syntax: str) -> InstanceHeader:
    sop_instance_uid = attributes.ascii(0x00080018)
    study_instance_uid = attributes.ascii(0x0020000D)
    for uid, name in (
        (sop_instance_uid, "(0008,0018) SOP Instance UID"),
        (study_instance_uid, "(0020,000D) Study Instance UID"),
    ):
        if not uid:
            raise RejectError(
                Reason.MISSING_UID, f"{name} is missing or empty; Strata needs it to store"
            )
    return InstanceHeader(
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=attributes.ascii(0x0020000E),
        study_instance_uid=study_instance_uid,
        sop_class_uid=attributes.ascii(0x00080016),
        modality=attributes.ascii(0x00080060),
        body_part=attributes.ascii(0x00180015),
        study_date=_date(attributes.ascii(0x00080020)),
        patient_id=attributes.text(0x00100020),
        accession_number=attributes.text(0x00080050),
        patient_name=attributes.text(0x00100010),
        transfer_syntax=transfer_syntax,
        manufacturer=attributes.text(0x00080070),
        model=attributes.text(0x00081090),
    )


def _date(value: str) -> datetime.date | None:
    """A DA value (YYYYMMDD, or the ACR-NEMA YYYY.MM.DD that pydicom also accepts)."""
    if len(value) == 10 and value[4] == value[7] == ".":
        value = value[:4] + value[5:7] + value[8:]
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


# --- pixel layout -----------------------------------------------------------------------


def _layout(attributes: _Attributes, *, little_endian: bool) -> PixelLayout:
    rows = attributes.required_integer(0x00280010)
    columns = attributes.required_integer(0x00280011)
    bits_allocated = attributes.required_integer(0x00280100)
    samples_per_pixel = attributes.optional_integer(0x00280002, default=1)
    frames = attributes.optional_integer(0x00280008, default=1)
    if frames < 1:
        raise RejectError(
            Reason.PIXEL_LENGTH_MISMATCH,
            f"(0028,0008) Number of Frames is {frames}; it must be a positive integer",
        )
    planar_configuration = 0
    if samples_per_pixel > 1:
        planar_configuration = attributes.optional_integer(0x00280006, default=0)
    return PixelLayout(
        rows=rows,
        columns=columns,
        samples_per_pixel=samples_per_pixel,
        bits_allocated=bits_allocated,
        bits_stored=attributes.optional_integer(0x00280101, default=bits_allocated),
        pixel_representation=attributes.optional_integer(0x00280103, default=0),
        planar_configuration=planar_configuration,
        photometric_interpretation=attributes.ascii(0x00280004),
        frames=frames,
        little_endian=little_endian,
    )


def _check_pixel_length(length: int, layout: PixelLayout) -> None:
    expected = layout.expected_length
    if length == expected or (expected % 2 == 1 and length == expected + 1):
        return
    samples = f"Samples per Pixel {layout.samples_per_pixel}"
    if layout.stored_samples_per_pixel != layout.samples_per_pixel:
        samples += f" ({layout.photometric_interpretation}: 2 stored per pixel)"
    pad = " (+ 1 pad byte)" if expected % 2 == 1 else ""
    raise RejectError(
        Reason.PIXEL_LENGTH_MISMATCH,
        f"(7FE0,0010) Pixel Data has {length} bytes but Rows {layout.rows} × "
        f"Columns {layout.columns} × {samples} × Bits Allocated {layout.bits_allocated} × "
        f"Number of Frames {layout.frames} need {expected}{pad}",
    )
