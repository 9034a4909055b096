"""What an object's segments hold, and the manifest (segment 0) that describes them.

Two shapes:

* ``split`` — the pixel data was re-encoded losslessly. Segments: manifest, the file's bytes
  before the Pixel Data value (prefix), one codestream per frame, the bytes after it
  (suffix). The original is prefix + decoded pixels + trailing pad + suffix.
* ``whole`` — the file itself. Segments: manifest, the whole file, zstd-compressed when
  ``compression`` is ``"zstd"`` (native pixels no codec can hold), else as received.

The manifest makes every object self-describing, so that the archive can be rebuilt from
the object store alone if the catalog is lost: with the stored file's header it gives every
column of the object's catalog row (``cluster/catalog/rebuild.py``). ``sop_instance_uid``,
``ingest_time``, ``storage_note`` and ``source`` were added later; a manifest without them
reads as empty values, and readers that do not know them ignore them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from workers.dicom.split import PixelLayout

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    """Segment 0 of every object (encrypted like the rest)."""

    kind: str  # "split" or "whole"
    sha256: str  # of the original file
    original_length: int
    transfer_syntax_in: str
    transfer_syntax_stored: str
    layout: PixelLayout | None = None
    trailing: bytes = b""
    frame_count: int = 0
    compression: str = ""  # "zstd" or "" (only for kind "whole")
    # 8-bit OW big endian: the file holds the decoded value with every byte pair swapped.
    pairs_swapped: bool = False
    # What the catalog row holds that the stored file cannot tell. The UID is the one bound
    # into every segment's associated data: a reader without a catalog learns it here.
    sop_instance_uid: str = ""
    ingest_time: datetime | None = None  # UTC, to the microsecond, as in the catalog
    storage_note: str = ""
    source: str = ""  # the door it came through (InstanceRecord.source)

    @property
    def storage_action(self) -> str:
        """The catalog's ``storage_action``: transcoded, zstd or as_received."""
        if self.kind == "split":
            return "transcoded"
        return "zstd" if self.compression == "zstd" else "as_received"

    def to_bytes(self) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "kind": self.kind,
            "sha256": self.sha256,
            "original_length": self.original_length,
            "transfer_syntax_in": self.transfer_syntax_in,
            "transfer_syntax_stored": self.transfer_syntax_stored,
            "layout": asdict(self.layout) if self.layout else None,
            "trailing": base64.b64encode(self.trailing).decode(),
            "frame_count": self.frame_count,
            "compression": self.compression,
            "pairs_swapped": self.pairs_swapped,
            "sop_instance_uid": self.sop_instance_uid,
            "ingest_time": (
                self.ingest_time.astimezone(UTC).isoformat(timespec="microseconds")
                if self.ingest_time
                else None
            ),
            "storage_note": self.storage_note,
            "source": self.source,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        document = json.loads(raw)
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"manifest format {document.get('format')!r} is not supported")
        layout = document["layout"]
        moment = document.get("ingest_time")
        return cls(
            kind=document["kind"],
            sha256=document["sha256"],
            original_length=document["original_length"],
            transfer_syntax_in=document["transfer_syntax_in"],
            transfer_syntax_stored=document["transfer_syntax_stored"],
            layout=PixelLayout(**layout) if layout else None,
            trailing=base64.b64decode(document["trailing"]),
            frame_count=document["frame_count"],
            compression=document.get("compression", ""),
            pairs_swapped=document.get("pairs_swapped", False),
            sop_instance_uid=document.get("sop_instance_uid", ""),
            ingest_time=datetime.fromisoformat(moment) if moment else None,
            storage_note=document.get("storage_note", ""),
            source=document.get("source", ""),
        )

    def frame_segment(self, frame: int) -> int:
        """Index of the segment holding ``frame`` (0-based) in a ``split`` object."""
        return 2 + frame
