"""The DICOMweb door: STOW-RS, QIDO-RS, WADO-RS (``app``), served by uvicorn (``server``)."""

from cluster.doors.web.server import WebDoor, WebSettings

__all__ = ["WebDoor", "WebSettings"]
