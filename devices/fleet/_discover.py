"""``tandem fleet discover``: Tandem devices and gateways announced on the LAN over mDNS.

Devices announce ``_tandem._tcp.local.`` with TXT properties ``id`` (device id), and optionally
``profile``, ``fleet`` and ``version``; the fleet marks those whose id is enrolled. Browsing runs
for a fixed time on the given interfaces (all by default; the tests use 127.0.0.1 only) and
never announces anything itself. zeroconf is imported on use (the ``discovery`` extra).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from tandem.protocol.errors import Unavailable
from tandem.protocol.lazy import require

__all__ = ["SERVICE_TYPE", "Discovered", "browse"]

SERVICE_TYPE = "_tandem._tcp.local."
_MAX_SERVICES = 4096  # a LAN full of announcements must not grow this without bound
_TXT_KEYS = ("id", "profile", "fleet", "version")
_RESOLVE_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class Discovered:
    name: str  # the mDNS instance name
    device_id: str  # TXT "id" ("" when absent)
    addresses: tuple[str, ...]
    port: int
    properties: dict[str, str]


def _text(value: bytes | None) -> str:
    if value is None:
        return ""
    return "".join(c if c.isprintable() else "?" for c in value[:128].decode("utf-8", "replace"))


def browse(timeout_s: float = 3.0, *, interfaces: list[str] | None = None) -> list[Discovered]:
    """Browse for ``timeout_s`` seconds; the services found, sorted by device id then name."""
    zeroconf = require("zeroconf", "discovery")
    names: list[str] = []
    seen: set[str] = set()
    lock = threading.Lock()

    def on_change(zeroconf, service_type, name, state_change) -> None:
        if state_change is added:
            with lock:
                if name not in seen and len(seen) < _MAX_SERVICES:
                    seen.add(name)
                    names.append(name)

    added = zeroconf.ServiceStateChange.Added
    try:
        zc = zeroconf.Zeroconf(interfaces=interfaces or zeroconf.InterfaceChoice.All,
                               ip_version=zeroconf.IPVersion.V4Only)
    except OSError as exc:
        raise Unavailable(f"cannot start mDNS browsing: {exc.strerror or exc}") from exc
    found: list[Discovered] = []
    try:
        browser = zeroconf.ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        finally:
            browser.cancel()
        with lock:
            candidates = list(names)
        for name in candidates:
            # the browse usually cached the records already; ask the network only if not
            info = zeroconf.ServiceInfo(SERVICE_TYPE, name)
            if not info.load_from_cache(zc):
                info.request(zc, timeout=_RESOLVE_TIMEOUT_MS)
            props = {k.decode("utf-8", "replace"): _text(v)
                     for k, v in (info.properties or {}).items()
                     if isinstance(k, bytes) and k.decode("utf-8", "replace") in _TXT_KEYS}
            addresses = tuple(socket.inet_ntoa(a) for a in info.addresses if len(a) == 4)
            # a service that did not resolve is still listed (by name, without an id)
            found.append(Discovered(name=_text(name.encode()), device_id=props.get("id", ""),
                                    addresses=addresses, port=info.port or 0,
                                    properties=props))
    finally:
        zc.close()
    return sorted(found, key=lambda d: (d.device_id, d.name))
