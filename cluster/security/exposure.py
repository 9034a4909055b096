"""The rule every door follows: loopback, or TLS and authentication.

The seed of this project is 45 million medical images found on DICOM servers that anyone
could reach. A door therefore listens on 127.0.0.1 unless configured otherwise, and
refuses to start on any other address until every setting that makes it safe there is
set; the message names the ones missing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is this machine's loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def exposure_problem(door: str, host: str, required: Mapping[str, object]) -> str | None:
    """Why ``door`` may not listen on ``host`` with these settings (key -> value; an empty
    value is unset), or None when it may."""
    if is_loopback(host):
        return None
    missing = [key for key, value in required.items() if not value]
    if not missing:
        return None
    return (
        f"the {door} door may listen on {host} only with TLS and authentication; "
        f"set {', '.join(missing)}"
    )
