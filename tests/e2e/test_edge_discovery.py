"""Presence in the whole system, on 127.0.0.1 only: with no ``--broker`` the daemon uses the
broker announced over mDNS (``_mqtt._tcp``), and announces its own API (``_tandem._tcp``)
with its device id, model and port."""

from __future__ import annotations

import socket
import time
import uuid

import numpy as np
import pytest

zeroconf = pytest.importorskip("zeroconf")
pytestmark = pytest.mark.broker
LOOPBACK = ["127.0.0.1"]


def test_the_daemon_finds_the_broker_and_announces_itself(system, e2e_bundles):
    bundle = system.add_to_repo(e2e_bundles["residual"])
    system.start_worker("w1")
    zc = zeroconf.Zeroconf(interfaces=LOOPBACK, ip_version=zeroconf.IPVersion.V4Only)
    # a name that sorts before any broker another process may announce on this loopback
    name = f"000-e2e-{uuid.uuid4().hex[:8]}._mqtt._tcp.local."
    zc.register_service(zeroconf.ServiceInfo(
        "_mqtt._tcp.local.", name, addresses=[socket.inet_aton("127.0.0.1")],
        port=system.broker.port))
    try:
        system.start_edge(bundle, broker=False, env={
            "TANDEM_ADVERTISE": "true", "TANDEM_INTERFACES": "127.0.0.1",
            "TANDEM_DISCOVERY_TIMEOUT_S": "5"})
        assert system.status()["broker"] == system.broker_url
        with system.client() as client:
            x = {"input": np.zeros((1, 3, 16, 16), np.float32)}
            assert client.infer(x, mode="cloud").ran == "cloud"
        info = None
        deadline = time.monotonic() + 10
        while info is None and time.monotonic() < deadline:
            info = zc.get_service_info("_tandem._tcp.local.", "cam-e2e._tandem._tcp.local.",
                                       timeout=500)
        assert info is not None and info.port == system.api_port
        props = {k.decode(): v.decode() for k, v in info.properties.items()}
        assert props["id"] == "cam-e2e" and props["model"] == "residual"
        assert props["port"] == str(system.api_port)
    finally:
        zc.unregister_all_services()
        zc.close()
