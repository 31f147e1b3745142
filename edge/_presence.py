"""Presence on the LAN (zeroconf, the ``discovery`` extra; imported on use).

* :class:`Advertiser` announces the local API as ``<device id>._tandem._tcp.local.`` with TXT
  properties ``id`` (device id), ``model``, ``port``, ``path`` (``/v2``), ``profile`` and
  ``version`` (what ``tandem fleet discover`` reads), on the configured interfaces (addresses;
  all by default). :meth:`Advertiser.update` re-announces after a bundle switch.
* :func:`discover_broker` browses ``_mqtt._tcp.local.`` for a while and returns
  ``mqtt://host:port`` of the first broker found (instances sorted by name), or None.

zeroconf's errors (OSError from its sockets, its own exceptions) are translated here into
:class:`~tandem.protocol.errors.Unavailable`; the daemon logs them and runs without presence.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from tandem.protocol.errors import Unavailable
from tandem.protocol.lazy import require

__all__ = ["BROKER_SERVICE", "SERVICE_TYPE", "Advertiser", "discover_broker"]

log = logging.getLogger("tandem.edge.presence")

SERVICE_TYPE = "_tandem._tcp.local."
BROKER_SERVICE = "_mqtt._tcp.local."
_MAX_FOUND = 256


def _zeroconf(interfaces: list[str] | None) -> Any:
    zeroconf = require("zeroconf", "discovery")
    try:
        return zeroconf.Zeroconf(interfaces=interfaces or zeroconf.InterfaceChoice.All,
                                 ip_version=zeroconf.IPVersion.V4Only)
    except (OSError, zeroconf.Error) as exc:
        raise Unavailable(f"cannot start mDNS: {exc}") from exc


def _addresses(host: str, interfaces: list[str] | None) -> list[bytes]:
    if interfaces:
        return [socket.inet_aton(a) for a in interfaces if _is_ipv4(a)]
    if host not in ("", "0.0.0.0"):
        return [socket.inet_aton(host)] if _is_ipv4(host) else []
    found: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    except OSError:
        pass
    return [socket.inet_aton(a) for a in sorted(found)] or [socket.inet_aton("127.0.0.1")]


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_aton(text)
    except OSError:
        return False
    return text.count(".") == 3


class Advertiser:
    """Announce the local API over mDNS (see the module docstring). Blocking calls: run them
    in a worker thread."""

    def __init__(self, device_id: str, port: int, host: str, *,
                 interfaces: list[str] | None = None) -> None:
        self.device_id = device_id
        self.port = port
        self.host = host
        self.interfaces = interfaces
        self._zc: Any = None
        self._info: Any = None
        self._lock = threading.Lock()

    def _service(self, properties: dict[str, str]) -> Any:
        zeroconf = require("zeroconf", "discovery")
        props = {"id": self.device_id, "port": str(self.port), "path": "/v2", **properties}
        return zeroconf.ServiceInfo(
            SERVICE_TYPE, f"{self.device_id}.{SERVICE_TYPE}",
            addresses=_addresses(self.host, self.interfaces), port=self.port,
            properties={k: v[:200] for k, v in props.items()},
            server=f"tandem-{self.device_id}.local.")

    def start(self, properties: dict[str, str]) -> None:
        zeroconf = require("zeroconf", "discovery")
        with self._lock:
            self._zc = _zeroconf(self.interfaces)
            self._info = self._service(properties)
            try:
                self._zc.register_service(self._info, allow_name_change=True)
            except (OSError, zeroconf.Error) as exc:
                self._zc.close()
                self._zc = None
                raise Unavailable(f"cannot announce {SERVICE_TYPE}: {exc}") from exc

    def update(self, properties: dict[str, str]) -> None:
        zeroconf = require("zeroconf", "discovery")
        with self._lock:
            if self._zc is None:
                return
            info = self._service(properties)
            info.name = self._info.name  # keep a name the registration may have changed
            try:
                self._zc.update_service(info)
            except (OSError, zeroconf.Error) as exc:
                raise Unavailable(f"cannot update {SERVICE_TYPE}: {exc}") from exc
            self._info = info

    def close(self) -> None:
        with self._lock:
            zc, self._zc = self._zc, None
            if zc is None:
                return
            try:
                zc.unregister_all_services()
            except Exception as exc:  # zeroconf's errors on the way out change nothing
                log.debug("mDNS unregister failed: %s", exc)
            zc.close()


def discover_broker(timeout_s: float, *, interfaces: list[str] | None = None) -> str | None:
    """Browse ``_mqtt._tcp`` for up to ``timeout_s`` seconds (returning as soon as one broker
    is resolved); ``mqtt://host:port`` or None."""
    zeroconf = require("zeroconf", "discovery")
    zc = _zeroconf(interfaces)
    names: list[str] = []
    lock = threading.Lock()
    seen = threading.Event()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is added:
            with lock:
                if name not in names and len(names) < _MAX_FOUND:
                    names.append(name)
                    seen.set()

    added = zeroconf.ServiceStateChange.Added
    try:
        browser = zeroconf.ServiceBrowser(zc, BROKER_SERVICE, handlers=[on_change])
        deadline = time.monotonic() + timeout_s
        try:
            seen.wait(timeout_s)
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))  # let others answer
        finally:
            browser.cancel()
        with lock:
            candidates = sorted(names)
        for name in candidates:
            info = zc.get_service_info(BROKER_SERVICE, name,
                                       timeout=int(max(0.2, deadline - time.monotonic()) * 1000))
            if info is None or not info.port:
                continue
            v4 = [socket.inet_ntoa(a) for a in info.addresses if len(a) == 4]
            if v4:
                return f"mqtt://{v4[0]}:{info.port}"
    except (OSError, zeroconf.Error) as exc:
        raise Unavailable(f"mDNS browsing for a broker failed: {exc}") from exc
    finally:
        zc.close()
    return None
