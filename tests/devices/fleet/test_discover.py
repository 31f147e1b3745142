"""`tandem fleet discover`: mDNS browsing for _tandem._tcp, on 127.0.0.1 only (never the real
interface), marking the enrolled devices."""

from __future__ import annotations

import json
import socket
import uuid

import pytest

from tandem.cli import main

zeroconf = pytest.importorskip("zeroconf", reason="zeroconf not installed (the discovery extra)")


@pytest.fixture
def db_url():
    """The registry's database does not matter here: SQLite only."""
    return None


@pytest.fixture
def announced():
    """Two devices announced on 127.0.0.1 (instance names unique to this run): an enrolled
    one and a stranger, with a hostile TXT value."""
    tag = uuid.uuid4().hex[:8]
    zc = zeroconf.Zeroconf(interfaces=["127.0.0.1"], ip_version=zeroconf.IPVersion.V4Only)
    infos = [
        zeroconf.ServiceInfo(
            "_tandem._tcp.local.", f"cam-01-{tag}._tandem._tcp.local.",
            addresses=[socket.inet_aton("127.0.0.1")], port=8080,
            properties={"id": "cam-01", "profile": "jetson-orin-nano-8gb", "junk": "x"},
            server=f"cam-01-{tag}.local."),
        zeroconf.ServiceInfo(
            "_tandem._tcp.local.", f"stranger-{tag}._tandem._tcp.local.",
            addresses=[socket.inet_aton("127.0.0.1")], port=8081,
            properties={"id": f"stranger-{tag}", "profile": "\x1b[2Jevil"},
            server=f"stranger-{tag}.local."),
    ]
    for info in infos:
        zc.register_service(info)
    yield tag
    for info in infos:
        zc.unregister_service(info)
    zc.close()


def test_discover_lists_announced_devices_and_marks_the_enrolled(fleet, announced, capsys):
    fleet.add_device("cam-01", profile="jetson-orin-nano-8gb")
    args = ["fleet", "discover", "--interface", "127.0.0.1", "--timeout", "3",
            "--fleet-dir", str(fleet.layout.root), "--db", fleet.db.url]
    assert main([*args, "--json"]) == 0
    found = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    ours = {n: d for n, d in found.items() if announced in n}  # other announcers may exist
    assert len(ours) == 2
    cam = ours[f"cam-01-{announced}._tandem._tcp.local."]
    assert cam["enrolled"] is True and cam["device_id"] == "cam-01"
    assert cam["addresses"] == ["127.0.0.1"] and cam["port"] == 8080
    assert cam["properties"] == {"id": "cam-01", "profile": "jetson-orin-nano-8gb"}
    stranger = ours[f"stranger-{announced}._tandem._tcp.local."]
    assert stranger["enrolled"] is False and "\x1b" not in stranger["properties"]["profile"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "cam-01" in table and "yes" in table and "\x1b" not in table
