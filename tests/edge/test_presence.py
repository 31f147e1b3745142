"""Presence over mDNS, on 127.0.0.1 only: the daemon's ``_tandem._tcp`` announcement and the
broker found over ``_mqtt._tcp``."""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from tandem.edge._presence import BROKER_SERVICE, SERVICE_TYPE, Advertiser, discover_broker

zeroconf = pytest.importorskip("zeroconf")
LOOPBACK = ["127.0.0.1"]


def _browse(service: str, name: str, timeout_s: float = 5.0):
    zc = zeroconf.Zeroconf(interfaces=LOOPBACK, ip_version=zeroconf.IPVersion.V4Only)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = zc.get_service_info(service, name, timeout=500)
            if info is not None:
                return info
        return None
    finally:
        zc.close()


def test_the_api_is_announced_with_device_model_and_port():
    device = f"cam-{uuid.uuid4().hex[:8]}"
    adv = Advertiser(device, 8123, "127.0.0.1", interfaces=LOOPBACK)
    adv.start({"model": "residual", "profile": "cpu-x86_64", "version": "0.1.0"})
    try:
        info = _browse(SERVICE_TYPE, f"{device}.{SERVICE_TYPE}")
        assert info is not None and info.port == 8123
        props = {k.decode(): v.decode() for k, v in info.properties.items()}
        assert props["id"] == device and props["model"] == "residual" and props["port"] == "8123"
        assert socket.inet_ntoa(info.addresses[0]) == "127.0.0.1"
        adv.update({"model": "other", "profile": "cpu-x86_64", "version": "0.1.0"})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            info = _browse(SERVICE_TYPE, f"{device}.{SERVICE_TYPE}")
            if info is not None and info.properties.get(b"model") == b"other":
                break
        assert info.properties.get(b"model") == b"other"
    finally:
        adv.close()


def test_a_broker_advertised_over_mdns_is_found():
    # sorts before any other broker another process may announce on this loopback
    name = f"000-broker-{uuid.uuid4().hex[:8]}.{BROKER_SERVICE}"
    zc = zeroconf.Zeroconf(interfaces=LOOPBACK, ip_version=zeroconf.IPVersion.V4Only)
    zc.register_service(zeroconf.ServiceInfo(BROKER_SERVICE, name,
                                             addresses=[socket.inet_aton("127.0.0.1")],
                                             port=18831))
    try:
        assert discover_broker(5.0, interfaces=LOOPBACK) == "mqtt://127.0.0.1:18831"
    finally:
        zc.unregister_all_services()
        zc.close()
