"""Orthanc from Debian, started for a test or a benchmark: its own storage and index
directories, loopback only, and a configuration written here.

Used by the Orthanc interoperability test (Orthanc forwarding a study to Strata with
storage commitment) and by ``bench/vs_orthanc.py`` (Orthanc as the archive compared with).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

BINARY = "Orthanc"
# Orthanc's own transcoder (DCMTK) writes no JPEG 2000: its GDCM plugin (Debian's
# orthanc-gdcm) does.
GDCM_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")


def available() -> bool:
    return shutil.which(BINARY) is not None


class Orthanc:
    """One Orthanc process; ``modalities`` maps a name to (AE title, host, port)."""

    def __init__(
        self,
        root: Path,
        *,
        dicom_port: int,
        http_port: int,
        ae_title: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        ingest_transcoding: str = "",
        concurrent_jobs: int = 2,
    ) -> None:
        self.root = root
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.ae_title = ae_title
        self.url = f"http://127.0.0.1:{http_port}"
        self._process: subprocess.Popen[bytes] | None = None
        configuration: dict[str, Any] = {
            "Name": "strata-peer",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": False,  # loopback only, the test's own
            "DicomCheckCalledAet": True,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in (modalities or {}).items()
            },
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "ConcurrentJobs": concurrent_jobs,
            "StorageCompression": False,
            "OverwriteInstances": True,
            "Plugins": [],
        }
        if ingest_transcoding:
            if not GDCM_PLUGIN.exists():
                raise RuntimeError(
                    f"transcoding at ingest needs Orthanc's GDCM plugin ({GDCM_PLUGIN})"
                )
            configuration["IngestTranscoding"] = ingest_transcoding
            configuration["Plugins"] = [str(GDCM_PLUGIN)]
        self.configuration = configuration

    def start(self, timeout: float = 60.0) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.configuration, indent=2))
        log = (self.root / "orthanc.log").open("ab")
        self._process = subprocess.Popen([BINARY, str(path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Orthanc did not answer:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        path = self.root / "orthanc.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str, **kwargs: Any) -> Any:
        answer = requests.get(self.url + path, timeout=120, **kwargs)
        answer.raise_for_status()
        return answer.json() if "json" in answer.headers.get("Content-Type", "") else answer

    def post(self, path: str, body: Any, **kwargs: Any) -> Any:
        if isinstance(body, bytes):
            answer = requests.post(self.url + path, data=body, timeout=600, **kwargs)
        else:
            answer = requests.post(self.url + path, json=body, timeout=600, **kwargs)
        answer.raise_for_status()
        return answer.json()

    def disk_bytes(self) -> int:
        """Bytes Orthanc's storage area holds."""
        return sum(p.stat().st_size for p in (self.root / "storage").rglob("*") if p.is_file())
