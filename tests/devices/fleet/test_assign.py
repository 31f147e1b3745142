"""`tandem fleet assign`: verify and sign the bundle, store its archive, record the assignment
in one transaction and publish it retained to each device, through a real mosquitto running the
fleet's auth files; and everything that must be refused with nothing changed."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil

import pytest

from tandem.devices.fleet import load_enrollment
from tandem.devices.fleet._operations import assign, publish_all
from tandem.protocol import codec, topics
from tandem.protocol.bundle import (
    MANIFEST_NAME,
    BundleIntegrityError,
    generate_keypair,
    load_bundle,
    sign_bundle,
)
from tandem.protocol.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tandem.protocol.messages import Assignment
from tests.devices.fleet.test_broker import Inbox, apply, client
from tests.devices.fleet.test_registry import snapshot

pytestmark = pytest.mark.broker

BASE = "http://bundles.example:8080"


@pytest.fixture
def lobby(fleet, fleet_broker):
    fleet.add_group("lobby")
    for name in ("cam-01", "cam-02"):
        fleet.add_device(name, profile="cpu-x86_64", group="lobby")
    fleet.add_device("cam-03", profile="cpu-x86_64")
    apply(fleet_broker)
    return fleet


@pytest.fixture
def bundle(compiled_bundle, tmp_path):
    shutil.copytree(compiled_bundle, tmp_path / "bundle")
    return tmp_path / "bundle"


def run_assign(fleet, bundle, **kwargs):
    kwargs.setdefault("urls", (f"{BASE}/b.tar.zst",))
    return asyncio.run(assign(fleet, str(bundle), **kwargs))


def received_assignment(fleet, name, tmp_path) -> Assignment:
    inbox = Inbox()
    with client(fleet, name, tmp_path) as device:
        device.subscribe(topics.assign_topic(name), inbox)
        inbox.wait_for(topics.assign_topic(name))
    message = codec.decode(inbox.payloads[0])
    assert isinstance(message, Assignment)
    return message


def test_assign_signs_stores_records_and_publishes_retained(lobby, bundle, tmp_path):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    result = run_assign(lobby, bundle, devices=("cam-01",), sign=True)
    assert result.devices == ["cam-01"]
    with load_bundle(bundle) as original:
        digest = original.digest
        assert not original.signed  # the operator's bundle is left as it was
    archive = lobby.layout.bundles_dir / f"{digest}.tar.zst"
    data = archive.read_bytes()
    a = received_assignment(lobby, "cam-01", tmp_path)
    assert (a.device_id, a.bundle_digest, a.bundle_uri) == ("cam-01", digest,
                                                             f"{BASE}/b.tar.zst")
    assert (a.archive_size, a.archive_sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert a.model_name == result.model and a.model_version
    # the signature is over manifest.json and verifies with the key the device was enrolled with
    enrollment = load_enrollment(lobby.layout.enrollment("cam-01"))
    key = load_pem_public_key(enrollment.bundle_public_key_pem.encode())
    key.verify(a.signature, (bundle / MANIFEST_NAME).read_bytes())
    with load_bundle(archive, public_key=lobby.layout.signing_pub) as stored:
        assert stored.signature_verified and stored.digest == digest
    shown = lobby.show("cam-01")["assignment"]
    assert shown["bundle_digest"] == digest and shown["uris"] == [f"{BASE}/b.tar.zst"]


def test_assign_to_a_group_reaches_each_member_only(lobby, bundle, tmp_path):
    result = run_assign(lobby, bundle, group="lobby", sign=True, urls=(
        f"{BASE}/a.tar.zst", "https://mirror.example/a.tar.zst"))
    assert result.devices == ["cam-01", "cam-02"]
    for name in ("cam-01", "cam-02"):
        a = received_assignment(lobby, name, tmp_path)
        assert a.device_id == name and a.mirror_uris == ("https://mirror.example/a.tar.zst",)
    assigned = {c["name"]: c["bundle_digest"] for c in lobby.clients(kind="device")}
    assert assigned["cam-03"] is None and assigned["cam-01"] == result.digest


def test_assign_uses_the_fleets_bundle_base_url(lobby, bundle):
    settings = lobby.layout.settings.read_text().replace('base_url = ""',
                                                          f'base_url = "{BASE}"')
    lobby.layout.settings.write_text(settings)
    from tandem.devices.fleet import Fleet

    fleet = Fleet.open(lobby.layout.root, lobby.db.url)
    result = run_assign(fleet, bundle, devices=("cam-03",), sign=True, urls=())
    assert result.uris == [f"{BASE}/bundles/{result.digest}.tar.zst"]


def test_a_url_may_name_the_digest(lobby, bundle):
    """e.g. the cloud endpoint, which serves its repository's archives by bundle digest."""
    result = run_assign(lobby, bundle, devices=("cam-01",), sign=True,
                        urls=("http://cloud.example:8080/v2/bundles/{digest}",))
    assert result.uris == [f"http://cloud.example:8080/v2/bundles/{result.digest}"]


def test_an_already_signed_bundle_is_assigned_as_it_is(lobby, bundle):
    sign_bundle(bundle, lobby.layout.signing_key)
    result = run_assign(lobby, bundle, devices=("cam-01",))
    archive = lobby.layout.bundles_dir / f"{result.digest}.tar.zst"
    with load_bundle(archive) as stored:
        assert (stored.root / "manifest.sig").read_bytes() == \
            (bundle / "manifest.sig").read_bytes()
    # a second assignment of the same bundle reuses the stored archive
    before = archive.stat().st_mtime_ns
    run_assign(lobby, bundle, devices=("cam-02",))
    assert archive.stat().st_mtime_ns == before


def _refused(fleet, bundle, error, match, **kwargs):
    before = snapshot(fleet)
    with pytest.raises(error, match=match or None):
        run_assign(fleet, bundle, **kwargs)
    after = snapshot(fleet)
    assert after == before
    assert not list(fleet.layout.bundles_dir.iterdir())


def test_an_unsigned_bundle_is_refused_without_sign(lobby, bundle):
    _refused(lobby, bundle, FailedPrecondition, "not signed; pass --sign",
             devices=("cam-01",))


def test_a_bundle_signed_by_another_key_is_refused_without_sign(lobby, bundle, tmp_path):
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    sign_bundle(bundle, tmp_path / "other.key")
    _refused(lobby, bundle, FailedPrecondition, "not this fleet's", devices=("cam-01",))
    result = run_assign(lobby, bundle, devices=("cam-01",), sign=True)  # re-signed by the fleet
    with load_bundle(lobby.layout.bundles_dir / f"{result.digest}.tar.zst",
                     public_key=lobby.layout.signing_pub) as stored:
        assert stored.signature_verified


def test_a_tampered_bundle_is_refused_even_with_sign(lobby, bundle):
    part = next(p for p in sorted(bundle.rglob("*.onnx")))
    part.write_bytes(part.read_bytes() + b"\x00")
    _refused(lobby, bundle, BundleIntegrityError, "", devices=("cam-01",), sign=True)


def test_a_tampered_signature_is_refused(lobby, bundle):
    sign_bundle(bundle, lobby.layout.signing_key)
    sig = bytearray(base64.b64decode((bundle / "manifest.sig").read_bytes()))
    sig[0] ^= 1
    (bundle / "manifest.sig").write_bytes(base64.b64encode(bytes(sig)) + b"\n")
    _refused(lobby, bundle, FailedPrecondition, "not this fleet's", devices=("cam-01",))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"devices": ("cam-99",)}, NotFound, "no enrolled device 'cam-99'"),
    ({"devices": ("tandem-admin",)}, NotFound, "no enrolled device"),
    ({"devices": ("bad/id",)}, InvalidArgument, "must not contain"),
    ({"group": "nope"}, NotFound, "no group 'nope'"),
    ({"devices": ()}, InvalidArgument, "name a device"),
    ({"devices": ("cam-01",), "urls": ("ftp://x/y",)}, InvalidArgument, "http"),
    ({"devices": ("cam-01",), "urls": ()}, InvalidArgument, "no URL"),
])
def test_bad_targets_and_urls_change_nothing(lobby, bundle, kwargs, error, match):
    kwargs = {"sign": True, **kwargs}
    if "urls" not in kwargs:
        kwargs["urls"] = (f"{BASE}/b.tar.zst",)
    _refused(lobby, bundle, error, match, **kwargs)


def test_an_empty_group_is_refused(lobby, bundle):
    lobby.add_group("empty")
    _refused(lobby, bundle, FailedPrecondition, "no devices", group="empty", sign=True)


def test_an_unreachable_broker_changes_nothing(lobby, bundle, fleet_broker):
    fleet_broker.broker.stop()
    _refused(lobby, bundle, Unavailable, "", devices=("cam-01",), sign=True)


def test_sync_publish_republishes_every_assignment(lobby, bundle, fleet_broker, tmp_path):
    result = run_assign(lobby, bundle, group="lobby", sign=True)
    fleet_broker.restart()  # no persistence: the retained assignments are gone
    assert asyncio.run(publish_all(lobby)) == 2
    assert received_assignment(lobby, "cam-02", tmp_path).bundle_digest == result.digest


def test_removing_a_device_clears_its_retained_assignment(lobby, bundle, fleet_broker,
                                                          tmp_path):
    from tandem.cli import main

    run_assign(lobby, bundle, devices=("cam-01",), sign=True)
    assert main(["fleet", "remove", "cam-01", "--fleet-dir", str(lobby.layout.root),
                 "--db", lobby.db.url]) == 0
    lobby.add_device("cam-01", profile="cpu-x86_64")
    apply(fleet_broker)
    inbox = Inbox()
    # a marker the admin may publish and the device may read does not exist; publish a fresh
    # assignment after subscribing and check it is the first thing that arrives
    with client(lobby, "cam-01", tmp_path) as device:
        device.subscribe(topics.assign_topic("cam-01"), inbox)
        result = run_assign(lobby, bundle, devices=("cam-01",), urls=(f"{BASE}/new",),
                            sign=True)
        inbox.wait_for(topics.assign_topic("cam-01"))
    first = codec.decode(inbox.payloads[0])
    assert first.bundle_uri == f"{BASE}/new" and first.bundle_digest == result.digest

