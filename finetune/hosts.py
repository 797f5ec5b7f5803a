"""Which addresses only this machine can reach: the line between "local" and "exposed" for `web` and `serve`."""

from __future__ import annotations

import ipaddress
from typing import Optional
from urllib.parse import urlsplit

LOCAL_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; 0.0.0.0, a LAN address or any other name is reachable from
    elsewhere (or may be)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def header_host(value: str) -> Optional[str]:
    """The host name of an HTTP Host header (`127.0.0.1:8000`, `[::1]:8000`, `localhost`); None when malformed."""
    try:
        parts = urlsplit(f"//{value}")
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return None
    return parts.hostname
