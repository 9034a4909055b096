"""Rejections: a machine-readable reason code plus a sentence a person can act on."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why the archive refused a file or a call: one set for every door, each of which maps
    a reason to its own status. The values are part of the wire API."""

    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    MISSING_UID = "missing_uid"
    PIXEL_LENGTH_MISMATCH = "pixel_length_mismatch"
    TOO_LARGE = "too_large"
    INCOMPLETE_STREAM = "incomplete_stream"
    CHUNK_TOO_LARGE = "chunk_too_large"
    BAD_REQUEST = "bad_request"
    # Strata's side: nothing of the file was committed; the sender may send it again.
    STORAGE_FAILED = "storage_failed"
    # A component was down for longer than the commit deadline and whether the file's
    # catalog row landed could not be learned; a resend is answered DUPLICATE if it did.
    UNCONFIRMED = "commit_unconfirmed"
    # The node is not accepting work (a component is down and restarting); send later.
    UNAVAILABLE = "unavailable"
    # The sender sent nothing for longer than the idle timeout while holding budget.
    IDLE_TIMEOUT = "idle_timeout"
    INTERNAL = "internal_error"
    # Reads and searches (every door maps these to its own status).
    NOT_FOUND = "not_found"  # no stored instance (or frame) answers the request
    NO_SUCH_FRAME = "no_such_frame"  # the instance has fewer frames than the number asked
    TRANSCODE_REFUSED = "transcode_refused"  # the stored form cannot become the syntax asked
    DATA_LOSS = "data_loss"  # the stored object cannot be read back or failed its checks
    TIMEOUT = "timeout"  # a step did not answer within its deadline
    BUSY = "busy"  # as many calls are being served as the archive may serve at once
    # The study was deleted at the end of its retention (crypto-shredded): it cannot be
    # read, and a re-sent copy is not stored again.
    DELETED = "deleted"


class RejectError(Exception):
    """An input that Strata refuses to store; carries the reason code and a sentence.

    The sentence must never contain PHI: name the element and what is wrong with it,
    not the value of a patient attribute.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


def cause_of(error: BaseException) -> str:
    """A failure as a log may show it: its type and first line.

    Never the rows delta-rs prints after "Preview of invalid data" (UIDs, pseudonyms),
    nor the lines libraries add after the first."""
    text = str(error).split("Preview of invalid data", 1)[0].strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
