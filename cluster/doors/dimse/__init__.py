"""The DIMSE door: pynetdicom in front of the archive core."""

from cluster.doors.dimse.door import DimseDoor, DimseSettings, Peer

__all__ = ["DimseDoor", "DimseSettings", "Peer"]
