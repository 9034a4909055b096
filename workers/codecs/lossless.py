"""Lossless codecs for native Pixel Data behind one small interface.

As in pydicom, the caller asks for a transfer syntax, not a library: ``encode_verified``
encodes frame by frame with the codec registered for that syntax, decodes every frame
back and compares it bit for bit with the original before returning anything. A codec
is one ``_Codec`` entry in ``_CODECS``: the container sizes it can represent, and an
encode and a decode function over one frame held as a numpy array.

The codecs: HTJ2K lossless (OpenJPH through imagecodecs), JPEG 2000 lossless (OpenJPEG
through imagecodecs), JPEG-LS lossless (CharLS through pyjpegls, pydicom's own JPEG-LS
plugin) and JPEG Lossless, Process 14, both selection value 1 and the general syntax
(libjpeg-turbo through imagecodecs).

Frames are passed to the codecs as the raw containers (uint8/16 or int8/16, native byte
order) with every bit of the container, not masked to Bits Stored, so that overlay or
garbage bits above Bits Stored and the sign bits of signed data survive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import _CharLS  # pyjpegls' extension module: see _jpegls_encode_padded
import imagecodecs
import jpeg_ls  # pyjpegls
import numpy as np
import numpy.typing as npt

from workers.dicom.split import PixelLayout
from workers.records import HTJ2K_LOSSLESS

if TYPE_CHECKING:
    from hashlib import _Hash as Digest  # a running hash such as hashlib.sha256()

JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEGLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"  # Process 14, selection value (predictor) 1
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"  # Process 14, any predictor
# Predictor 4 (Ra + Rb - Rc, the planar one) for the general syntax: on the test data it
# is never more than 0.5 % larger than predictor 1 and up to 35 % smaller (CT), the best
# of the seven in total; every DICOM JPEG Lossless decoder implements all seven.
JPEG_LOSSLESS_PREDICTOR = 4

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"})
# Colour spaces kept as they are: no multi-component transform is applied, so the
# Photometric Interpretation of the encapsulated form stays the one the file declares
# (with the reversible colour transform it would have to become YBR_RCT).
_COLOUR = frozenset({"RGB", "YBR_FULL"})

Frame = npt.NDArray[np.integer]


class NotLossless(Exception):  # noqa: N818 - the pipeline's agreed name: not an error
    """This layout cannot be encoded losslessly by this codec; ``sentence`` says why."""

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence


@dataclass(frozen=True)
class EncodedPixels:
    """Pixel Data encoded one codestream per frame, as DICOM encapsulates it."""

    transfer_syntax: str
    # One raw codestream per frame: a J2K codestream without JP2 boxes, a JPEG-LS
    # stream (SOI, SOF55, ...) without a SPIFF header, or a lossless JPEG stream (SOI,
    # APP14, SOF3, ...).
    frames: tuple[bytes, ...]
    trailing: bytes  # bytes of the original value past layout.expected_length, usually b""


@dataclass(frozen=True)
class _Codec:
    name: str
    bits_allocated: frozenset[int]
    # encode(frame, layout) -> codestream; frame is native byte order, C-contiguous,
    # shaped (rows, columns), (rows, columns, 3) or (3, rows, columns) for planar 1.
    encode: Callable[[Frame, PixelLayout], bytes]
    # decode(codestream, planar, out) -> the frame, written into out when the library
    # can, else returned shaped like out; out's dtype is the container's (width,
    # signedness, native byte order) and its shape says planar or colour-by-pixel.
    decode: Callable[[bytes, bool, Frame], Frame]
    # check(layout) raises NotLossless for a layout the codec's transfer syntax does not
    # allow beyond what every codec checks (the profiles of PS3.5 section 8.2).
    check: Callable[[PixelLayout], None] = lambda layout: None


def _htj2k_encode(frame: Frame, layout: PixelLayout) -> bytes:
    # imagecodecs' htj2k_encode takes no precision: the codestream always declares the
    # full container width (8 or 16 bits) and the container's signedness, whatever
    # Bits Stored says. That is what keeps high garbage bits lossless; DICOM readers
    # (pydicom included) take the precision from the codestream.
    return bytes(
        imagecodecs.htj2k_encode(_colour_by_pixel(frame, layout), reversible=True, rgb=False)
    )


def _htj2k_decode(codestream: bytes, planar: bool, out: Frame) -> Frame:
    decoded: Frame = imagecodecs.htj2k_decode(codestream, planar=planar, out=out)
    return decoded


def _jpeg2k_encode(frame: Frame, layout: PixelLayout) -> bytes:
    # OpenJPEG takes a precision: declare Bits Stored when every value fits in it, as a
    # standard DICOM JPEG 2000 file does, and the full container width otherwise (high
    # bits in use, e.g. overlays), which is still lossless.
    # Not below 2 bits: OpenJPEG fails to write some 1-bit colour tiles ("opj_encode or
    # opj_write_tile failed"), found by hypothesis; the container width is still lossless.
    precision = frame.dtype.itemsize * 8
    if 2 <= layout.bits_stored < precision and _fits(frame, layout):
        precision = layout.bits_stored
    return bytes(
        imagecodecs.jpeg2k_encode(
            _colour_by_pixel(frame, layout),
            codecformat="J2K",
            reversible=True,
            bitspersample=precision,
            mct=False,
        )
    )


def _jpeg2k_decode(codestream: bytes, planar: bool, out: Frame) -> Frame:
    decoded: Frame = imagecodecs.jpeg2k_decode(codestream, planar=planar, out=out)
    return decoded


# JPEG-LS (ITU-T T.87) codes unsigned samples of 2 to 16 bits; DICOM records signedness in
# Pixel Representation only. Signed samples are therefore stored as their two's
# complement bit pattern at the codestream's precision P, and readers sign-extend from P
# (pydicom does, from the precision in the codestream). P is Bits Stored when every value
# fits in it, so the codestream is the one other DICOM encoders write; when a frame uses
# bits above Bits Stored, P is the container width and the pattern is the whole container
# reinterpreted as unsigned, which is still exact.


def _jpegls_check(layout: PixelLayout) -> None:
    """What PS3.5 Table 8.2.3-1 allows in a JPEG-LS lossless file, beyond the shared checks."""
    if layout.bits_stored < 2:
        raise NotLossless(
            f"(0028,0101) Bits Stored {layout.bits_stored} is not supported by JPEG-LS; it "
            "must be 2 to 16 (JPEG-LS has no 1-bit precision)"
        )
    if layout.samples_per_pixel == 3 and layout.pixel_representation != 0:
        raise NotLossless(
            "(0028,0103) Pixel Representation 1 (signed) with 3 samples per pixel is not "
            "allowed in JPEG-LS; colour samples must be unsigned (PS3.5 Table 8.2.3-1)"
        )
    if layout.photometric_interpretation == "YBR_FULL" and layout.bits_allocated != 8:
        raise NotLossless(
            f"(0028,0100) Bits Allocated {layout.bits_allocated} is not allowed for "
            "YBR_FULL in JPEG-LS; it must be 8 (PS3.5 Table 8.2.3-1)"
        )


def _jpegls_encode(frame: Frame, layout: PixelLayout) -> bytes:
    container = frame.dtype.itemsize * 8
    precision = layout.bits_stored if _fits(frame, layout) else container
    samples = _colour_by_pixel(frame, layout).view(f"u{frame.dtype.itemsize}")
    if precision < container and layout.pixel_representation == 1:
        samples = samples & ((1 << precision) - 1)  # drop the sign extension
    # pyjpegls takes little-endian samples of 1 byte up to precision 8, else 2.
    source = np.ascontiguousarray(samples, dtype="<u1" if precision <= 8 else "<u2").tobytes()
    interleave = 2 if layout.samples_per_pixel > 1 else 0
    shape = (layout.rows, layout.columns, layout.samples_per_pixel)
    try:
        codestream = jpeg_ls.encode_buffer(source, *shape, precision, 0, interleave)
    except RuntimeError as error:
        if "buffer is too small" not in str(error):
            raise
        codestream = _jpegls_encode_padded(source, shape, precision, interleave)
    return bytes(codestream)


def _jpegls_encode_padded(
    source: bytes, shape: tuple[int, int, int], precision: int, interleave: int
) -> bytes:
    """JPEG-LS of a frame that pyjpegls' public encoder has no room for.

    pyjpegls 1.5.1 gives CharLS an output buffer of twice the input, and JPEG-LS can
    expand a frame past that: tiny frames (the headers alone are 27 bytes or more) and
    noise in narrow frames. A lossless sample takes at most LIMIT = 2 × (P + max(8, P))
    bits (T.87 A.2.1), 4 × its container, plus one stuffed bit per 0xFF byte. CharLS
    reads only the frame from its input, so input padded to 3 × plus 128 bytes buys an
    output buffer (6 × plus 256 bytes) that always suffices.
    """
    padded = source + bytes(2 * len(source) + 128)
    rows, columns, samples = shape
    return bytes(_CharLS._encode(padded, 0, interleave, rows, columns, samples, precision))


def _jpegls_decode(codestream: bytes, planar: bool, out: Frame) -> Frame:
    pixels, info = jpeg_ls.decode_buffer(codestream)
    precision = int(info["bits_per_sample"])
    rows, columns, components = int(info["height"]), int(info["width"]), int(info["components"])
    decoded = np.frombuffer(pixels, dtype="<u1" if precision <= 8 else "<u2")
    if components == 1:
        decoded = decoded.reshape(rows, columns)
    elif info["interleave_mode"] == 0:  # colour-by-plane
        decoded = decoded.reshape(components, rows, columns)
        decoded = decoded if planar else np.moveaxis(decoded, 0, -1)
    else:
        decoded = decoded.reshape(rows, columns, components)
        decoded = np.moveaxis(decoded, -1, 0) if planar else decoded
    if decoded.shape != out.shape or decoded.itemsize > out.itemsize:
        raise ValueError(
            f"the JPEG-LS codestream holds {decoded.shape} samples of {precision} bits, "
            f"not {out.shape} of at most {out.itemsize * 8}"
        )
    np.copyto(out.view(f"u{out.itemsize}"), decoded)
    shift = out.itemsize * 8 - precision
    if out.dtype.kind == "i" and shift:
        # Sign-extend from the codestream's precision, as DICOM readers do.
        out <<= shift
        out >>= shift  # arithmetic: copies the sign bit down
    return out


# JPEG Lossless (ITU-T T.81 Process 14, Huffman, sequential) codes unsigned samples of 2 to
# 16 bits, and signed data is handled as for JPEG-LS: the two's complement pattern at the
# codestream's precision P. P is Bits Stored when every value fits, as other encoders
# write it, and the container width otherwise: when values use bits above Bits Stored, and
# when Bits Stored is 1 or a 16-bit container holds 8 bits or fewer (libjpeg-turbo codes
# P 2 to 8 from 8-bit samples and 9 to 16 from 16-bit ones). At the container width the
# pattern is the whole container, sign extension included, so readers need none.
#
# In lossless mode libjpeg-turbo keeps the input colour space: three components go out as
# they come in, labelled RGB (an Adobe APP14 segment with transform 0 and component IDs
# 'R', 'G', 'B') and decoded without conversion. For YBR_FULL samples the IDs are
# rewritten to 1, 2, 3, because readers (pydicom among them) take 'R', 'G', 'B' to mean
# the samples are RGB whatever the Photometric Interpretation says; transform 0 still
# tells them not to convert.
_JPEG_RGB_IDS = b"RGB"
_JPEG_NUMBERED_IDS = b"\x01\x02\x03"


def _jpeg_lossless_check(layout: PixelLayout) -> None:
    """What JPEG Lossless (T.81 Process 14) is given here, beyond the shared checks."""
    if layout.samples_per_pixel == 3 and layout.pixel_representation != 0:
        raise NotLossless(
            "(0028,0103) Pixel Representation 1 (signed) with 3 samples per pixel is not "
            "supported by JPEG Lossless; colour samples must be unsigned"
        )
    if layout.photometric_interpretation == "YBR_FULL" and layout.bits_allocated != 8:
        raise NotLossless(
            f"(0028,0100) Bits Allocated {layout.bits_allocated} is not supported for "
            "YBR_FULL by JPEG Lossless; it must be 8"
        )


def _jpeg_lossless_encoder(predictor: int) -> Callable[[Frame, PixelLayout], bytes]:
    """A Process 14 encoder with one predictor (selection value, T.81 Table H.1)."""

    def encode(frame: Frame, layout: PixelLayout) -> bytes:
        container = frame.dtype.itemsize * 8
        # libjpeg-turbo codes 8-bit containers at P 2 to 8, 16-bit ones at P 9 to 16.
        lowest = 2 if container == 8 else 9
        precision = container
        if lowest <= layout.bits_stored < container and _fits(frame, layout):
            precision = layout.bits_stored
        samples = _colour_by_pixel(frame, layout).view(f"u{frame.dtype.itemsize}")
        if precision < container and layout.pixel_representation == 1:
            samples = samples & ((1 << precision) - 1)  # drop the sign extension
        codestream = bytes(
            imagecodecs.jpeg8_encode(
                # A copy, not ascontiguousarray: a view of a planar frame with a side of
                # 1 can be flagged contiguous with strides libjpeg-turbo's wrapper refuses.
                np.array(samples, order="C"),
                lossless=True,
                predictor=predictor,
                bitspersample=precision,
            )
        )
        if layout.photometric_interpretation == "YBR_FULL":
            codestream = _renumber_components(codestream)
        return codestream

    return encode


def _renumber_components(codestream: bytes) -> bytes:
    """``codestream`` with component IDs 'R', 'G', 'B' replaced by 1, 2, 3 (SOF3, SOS)."""
    stream = bytearray(codestream)
    for marker, segment in _jpeg_segments(codestream):
        if marker == 0xC3:  # SOF3: P, Y, X, Nf, then Nf × (C, H/V, Tq)
            ids = slice(segment + 6, segment + 6 + 3 * 3, 3)
        elif marker == 0xDA:  # SOS: Ns, then Ns × (C, Td/Ta)
            ids = slice(segment + 1, segment + 1 + 2 * 3, 2)
        else:
            continue
        if bytes(stream[ids]) != _JPEG_RGB_IDS:
            raise ValueError(f"lossless JPEG component IDs are {bytes(stream[ids])!r}")
        stream[ids] = _JPEG_NUMBERED_IDS
    return bytes(stream)


def _jpeg_lossless_decode(codestream: bytes, planar: bool, out: Frame) -> Frame:
    # colorspace given: component IDs 1, 2, 3 would otherwise be taken as YCbCr, which
    # libjpeg-turbo refuses to convert in lossless mode.
    three = out.ndim == 3
    colorspace = "rgb" if three else None
    decoded: Frame = imagecodecs.jpeg8_decode(
        codestream, colorspace=colorspace, outcolorspace=colorspace
    )
    precision = _jpeg_precision(codestream)
    if three and planar:
        decoded = np.moveaxis(decoded, -1, 0)
    if decoded.shape != out.shape or decoded.itemsize > out.itemsize:
        raise ValueError(
            f"the JPEG codestream holds {decoded.shape} samples of {precision} bits, "
            f"not {out.shape} of at most {out.itemsize * 8}"
        )
    np.copyto(out.view(f"u{out.itemsize}"), decoded, casting="unsafe")
    shift = out.itemsize * 8 - precision
    if out.dtype.kind == "i" and shift:
        out <<= shift
        out >>= shift  # arithmetic: copies the sign bit down
    return out


def _jpeg_precision(codestream: bytes) -> int:
    """The sample precision P in a lossless JPEG codestream's SOF3 segment."""
    for marker, segment in _jpeg_segments(codestream):
        if marker == 0xC3:
            return codestream[segment]
    raise ValueError("the codestream has no SOF3 (lossless JPEG) segment")


def _jpeg_segments(codestream: bytes) -> Iterator[tuple[int, int]]:
    """(marker, offset of its parameters) for each segment after SOI, up to SOS."""
    position = 2
    while position + 4 <= len(codestream) and codestream[position] == 0xFF:
        marker = codestream[position + 1]
        yield marker, position + 4
        if marker == 0xDA:  # entropy-coded data follows
            return
        position += 2 + int.from_bytes(codestream[position + 2 : position + 4], "big")


def _colour_by_pixel(frame: Frame, layout: PixelLayout) -> Frame:
    """The frame shaped (rows, columns[, samples]): a view, moved from planar if need be.

    Every codec is given colour-by-pixel samples, the order DICOM encapsulates anyway
    (JPEG-LS: interleave mode 2). imagecodecs guesses the layout from the array's shape
    and takes a planar frame of one column, (3, rows, 1), for a grey image of 3 rows and
    Rows columns: bit-exact on the way back, but not the image for any other reader.
    """
    if layout.planar_configuration == 1 and layout.samples_per_pixel > 1:
        return np.moveaxis(frame, 0, -1)
    return frame


def _fits(frame: Frame, layout: PixelLayout) -> bool:
    """Whether every value of ``frame`` is representable in Bits Stored bits."""
    if frame.size == 0:
        return True
    if layout.pixel_representation == 1:
        limit = 1 << (layout.bits_stored - 1)
        return bool(-limit <= frame.min() and frame.max() < limit)
    return bool(frame.max() < 1 << layout.bits_stored)


def values_fit_bits_stored(pixel_data: bytes | memoryview, layout: PixelLayout) -> bool:
    """Whether no sample uses the bits above Bits Stored (overlays or stray high bits).

    Those bits survive every codec here, but a reader of a compressed file sees them as
    pixel values while a reader of the native file masks them off: the two would differ.
    """
    if layout.bits_stored >= layout.bits_allocated:
        return True
    return _fits(_frames(pixel_data, layout), layout)


_CODECS: dict[str, _Codec] = {
    # 32-bit frames round-trip through OpenJPH, but OpenJPEG (imagecodecs' jpeg2k and
    # pylibjpeg-openjpeg, which pydicom decodes with) cannot read a codestream of 32-bit
    # precision ("failed to read the header"): readers could not open the stored form.
    HTJ2K_LOSSLESS: _Codec(
        name="HTJ2K",
        bits_allocated=frozenset({8, 16}),
        encode=_htj2k_encode,
        decode=_htj2k_decode,
    ),
    JPEG2000_LOSSLESS: _Codec(
        name="JPEG 2000",
        bits_allocated=frozenset({8, 16}),
        encode=_jpeg2k_encode,
        decode=_jpeg2k_decode,
    ),
    # pyjpegls (CharLS 2) rather than imagecodecs' jpegls_encode, which writes a SPIFF
    # header that DICOM does not encapsulate and cannot be told the precision.
    JPEGLS_LOSSLESS: _Codec(
        name="JPEG-LS",
        bits_allocated=frozenset({8, 16}),
        encode=_jpegls_encode,
        decode=_jpegls_decode,
        check=_jpegls_check,
    ),
    JPEG_LOSSLESS_SV1: _Codec(
        name="JPEG Lossless SV1",
        bits_allocated=frozenset({8, 16}),
        encode=_jpeg_lossless_encoder(predictor=1),
        decode=_jpeg_lossless_decode,
        check=_jpeg_lossless_check,
    ),
    JPEG_LOSSLESS: _Codec(
        name="JPEG Lossless",
        bits_allocated=frozenset({8, 16}),
        encode=_jpeg_lossless_encoder(predictor=JPEG_LOSSLESS_PREDICTOR),
        decode=_jpeg_lossless_decode,
        check=_jpeg_lossless_check,
    ),
}


def lossless_transfer_syntaxes() -> frozenset[str]:
    """The transfer syntaxes ``encode_verified`` can produce."""
    return frozenset(_CODECS)


def encode_verified(
    pixel_data: bytes | memoryview,
    layout: PixelLayout,
    transfer_syntax: str = HTJ2K_LOSSLESS,
    *,
    digest: Digest | None = None,
) -> EncodedPixels:
    """Encode native Pixel Data frame by frame; every frame is proven to decode bit-exact.

    Raises NotLossless when the codec cannot represent the layout or when any frame does
    not decode back to exactly its original bytes. With ``digest``, each decoded frame is
    fed to it in the file's byte order, so a caller can hash the rebuilt file from the
    one decode that verification already does (the trailing pad byte is not included).
    """
    codec = _codec(transfer_syntax)
    _check_supported(codec, layout)
    frames = _frames(pixel_data, layout)
    native_order = frames.dtype.isnative
    scratch: Frame | None = None
    codestreams = []
    for index, stored in enumerate(frames):
        frame = stored if native_order else stored.byteswap().view(stored.dtype.newbyteorder())
        try:
            codestream = codec.encode(frame, layout)
            if scratch is None:
                scratch = np.empty_like(frame)
            decoded = _decode_into(codec, codestream, layout.planar_configuration == 1, scratch)
        except (RuntimeError, ValueError) as error:
            raise NotLossless(
                f"{codec.name} failed on frame {index + 1} of {layout.frames} "
                f"({type(error).__name__}); the layout is not supported"
            ) from error
        if not np.array_equal(decoded, frame):
            raise NotLossless(
                f"frame {index + 1} of {layout.frames} did not decode bit-exact with "
                f"{codec.name}; it cannot be stored losslessly in that transfer syntax"
            )
        if digest is not None:
            digest.update((decoded if native_order else decoded.byteswap()).data)
        codestreams.append(codestream)
    return EncodedPixels(
        transfer_syntax=transfer_syntax,
        frames=tuple(codestreams),
        trailing=bytes(memoryview(pixel_data)[layout.expected_length :]),
    )


def decode_to_native(encoded: EncodedPixels, layout: PixelLayout) -> bytes:
    """The original Pixel Data value: same byte order, planar configuration and pad byte."""
    codec = _codec(encoded.transfer_syntax)
    if len(encoded.frames) != layout.frames:
        raise ValueError(
            f"{len(encoded.frames)} encoded frames for a layout of {layout.frames} frames"
        )
    # Uninitialised: every byte is written below. The one copy left is tobytes(),
    # which makes the immutable result.
    value = np.empty(layout.expected_length + len(encoded.trailing), dtype=np.uint8)
    frames = _frames(value, layout, native_order=True)
    planar = layout.planar_configuration == 1
    for codestream, out in zip(encoded.frames, frames, strict=True):
        _decode_into(codec, codestream, planar, out)
    if not layout.little_endian:
        frames.byteswap(inplace=True)
    value[layout.expected_length :] = np.frombuffer(encoded.trailing, dtype=np.uint8)
    return value.tobytes()


def decode_frame(codestream: bytes, layout: PixelLayout, transfer_syntax: str) -> Frame:
    """One decoded frame in native byte order, shaped (rows, columns[, samples]).

    Raises ValueError when the codestream does not hold a frame of that layout.
    """
    out = np.empty(_frame_shape(layout, planar=False), dtype=_dtype(layout, native_order=True))
    return _decode_into(_codec(transfer_syntax), codestream, False, out)


def _decode_into(codec: _Codec, codestream: bytes, planar: bool, out: Frame) -> Frame:
    """Decode one frame into ``out``; returns ``out``."""
    decoded = codec.decode(codestream, planar, out)
    if decoded.shape != out.shape:
        # OpenJPEG drops a width of 1 from planar frames; the samples are the same.
        if decoded.size != out.size:
            raise ValueError(f"decoded frame is {decoded.shape}, expected {out.shape}")
        decoded = decoded.reshape(out.shape)
    if not np.may_share_memory(decoded, out):
        out[...] = decoded
    return out


def _codec(transfer_syntax: str) -> _Codec:
    try:
        return _CODECS[transfer_syntax]
    except KeyError:
        raise NotLossless(
            f"no lossless codec is registered for transfer syntax {transfer_syntax}"
        ) from None


def _check_supported(codec: _Codec, layout: PixelLayout) -> None:
    """Raise NotLossless, naming the attribute, for a layout the codec cannot represent."""
    if layout.bits_allocated not in codec.bits_allocated:
        allowed = ", ".join(str(bits) for bits in sorted(codec.bits_allocated))
        raise NotLossless(
            f"(0028,0100) Bits Allocated {layout.bits_allocated} is not supported by "
            f"{codec.name}; it must be {allowed}"
        )
    if not 1 <= layout.bits_stored <= layout.bits_allocated:
        raise NotLossless(
            f"(0028,0101) Bits Stored {layout.bits_stored} must be between 1 and "
            f"Bits Allocated {layout.bits_allocated}"
        )
    if layout.pixel_representation not in (0, 1):
        raise NotLossless(
            f"(0028,0103) Pixel Representation {layout.pixel_representation} must be 0 or 1"
        )
    photometric = layout.photometric_interpretation
    if layout.samples_per_pixel == 1:
        if photometric not in _MONOCHROME:
            raise NotLossless(
                f"(0028,0004) Photometric Interpretation {photometric!r} with one sample "
                f"per pixel is not supported by {codec.name}"
            )
    elif layout.samples_per_pixel == 3:
        if photometric not in _COLOUR:
            raise NotLossless(
                f"(0028,0004) Photometric Interpretation {photometric!r} is not supported "
                f"by {codec.name} (only RGB and YBR_FULL; native YBR_*_422 is subsampled)"
            )
        if layout.planar_configuration not in (0, 1):
            raise NotLossless(
                f"(0028,0006) Planar Configuration {layout.planar_configuration} must be 0 or 1"
            )
    else:
        raise NotLossless(
            f"(0028,0002) Samples per Pixel {layout.samples_per_pixel} is not supported "
            f"by {codec.name}; it must be 1 or 3"
        )
    if layout.rows < 1 or layout.columns < 1 or layout.frames < 1:
        raise NotLossless(
            f"an image of Rows {layout.rows} × Columns {layout.columns} × "
            f"Number of Frames {layout.frames} has no pixels to encode"
        )
    codec.check(layout)


def _frame_shape(layout: PixelLayout, *, planar: bool) -> tuple[int, ...]:
    if layout.samples_per_pixel == 1:
        return (layout.rows, layout.columns)
    if planar:
        return (layout.samples_per_pixel, layout.rows, layout.columns)
    return (layout.rows, layout.columns, layout.samples_per_pixel)


def _dtype(layout: PixelLayout, *, native_order: bool) -> np.dtype[np.integer]:
    """The container of one sample: width, signedness and the file's or native byte order."""
    order = "=" if native_order else ("<" if layout.little_endian else ">")
    kind = "i" if layout.pixel_representation == 1 else "u"
    return np.dtype(f"{order}{kind}{layout.bits_allocated // 8}")


def _frames(
    buffer: bytes | memoryview | npt.NDArray[np.uint8],
    layout: PixelLayout,
    *,
    native_order: bool = False,
) -> Frame:
    """All frames as one array view over ``buffer``: (frames, *frame shape), no copy."""
    if len(buffer) < layout.expected_length:
        raise ValueError(
            f"(7FE0,0010) Pixel Data has {len(buffer)} bytes; the layout needs "
            f"{layout.expected_length}"
        )
    dtype = _dtype(layout, native_order=native_order)
    shape = _frame_shape(layout, planar=layout.planar_configuration == 1)
    count = layout.expected_length // dtype.itemsize
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(layout.frames, *shape)
