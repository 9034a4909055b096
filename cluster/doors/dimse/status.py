"""The archive's reasons as DIMSE statuses (PS3.4 Annex B, PS3.7 Annex C): one table.

C-STORE failures fall in three families a modality acts on differently: "out of
resources" (0xA7xx: try again later, nothing wrong with the file), "data set does not
match SOP class" (0xA9xx: the file is malformed for what it claims to be) and "cannot
understand" (0xCxxx: not something the archive can read at all). The low byte says which
reason, so that an operator reading a modality's log can tell them apart.
"""

from __future__ import annotations

from workers.errors import Reason

SUCCESS = 0x0000
# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
# N-ACTION / storage commitment failure reasons (PS3.4 J.3.3, Failure Reason (0008,1197))
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
# Query/retrieve (PS3.4 C.4)
PENDING = 0xFF00
UNABLE_TO_PROCESS = 0xC001
IDENTIFIER_DOES_NOT_MATCH = 0xA900
MOVE_DESTINATION_UNKNOWN = 0xA801
SUB_OPERATIONS_WARNING = 0xB000
NOT_AUTHORISED = 0x0124

_STORE = {
    Reason.NOT_DICOM: CANNOT_UNDERSTAND + 0x01,
    Reason.TRUNCATED: DATA_SET_DOES_NOT_MATCH + 0x01,
    Reason.MISSING_UID: DATA_SET_DOES_NOT_MATCH + 0x02,
    Reason.PIXEL_LENGTH_MISMATCH: DATA_SET_DOES_NOT_MATCH + 0x03,
    Reason.TOO_LARGE: OUT_OF_RESOURCES + 0x01,
    Reason.STORAGE_FAILED: OUT_OF_RESOURCES + 0x02,
    Reason.UNAVAILABLE: OUT_OF_RESOURCES + 0x03,
    Reason.UNCONFIRMED: OUT_OF_RESOURCES + 0x04,
    Reason.BUSY: OUT_OF_RESOURCES + 0x05,
    Reason.TIMEOUT: OUT_OF_RESOURCES + 0x06,
    Reason.INTERNAL: CANNOT_UNDERSTAND + 0x02,
    Reason.DELETED: CANNOT_UNDERSTAND + 0x03,  # its study's retention ended: not stored again
}


def store_status(status: str, reason: str) -> int:
    """The C-STORE status for a result of the archive's ``store``.

    Stored and duplicate are both success: the archive holds the instance, byte for byte
    (a duplicate is a re-send of what it holds)."""
    if status in ("stored", "duplicate"):
        return SUCCESS
    try:
        return _STORE[Reason(reason)]
    except (ValueError, KeyError):
        return CANNOT_UNDERSTAND + 0x02


def error_comment(message: str) -> str:
    """A message as an Error Comment (0000,0902): LO in the default character set, so
    ASCII only, and at most 64 characters."""
    text = " ".join(message.replace("×", "x").split())
    text = text.encode("ascii", "replace").decode("ascii")
    return text if len(text) <= 64 else text[:61] + "..."


# C-FIND, C-MOVE and C-GET (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
OUT_OF_RESOURCES_MATCHES = 0xA701
OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
_QUERY = {
    Reason.BAD_REQUEST: IDENTIFIER_DOES_NOT_MATCH,
    Reason.BUSY: OUT_OF_RESOURCES,
    Reason.UNAVAILABLE: OUT_OF_RESOURCES,
    Reason.TIMEOUT: OUT_OF_RESOURCES,
}


def query_status(reason: Reason, retrieve: bool = False) -> int:
    """The status of a C-FIND (or, with ``retrieve``, C-MOVE / C-GET) the archive could
    not answer for ``reason``."""
    found = _QUERY.get(reason, UNABLE_TO_PROCESS)
    if found == OUT_OF_RESOURCES:
        return OUT_OF_RESOURCES_MATCHES if retrieve else OUT_OF_RESOURCES
    return found
