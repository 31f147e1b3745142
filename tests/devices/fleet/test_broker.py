"""The generated password file, ACL, TLS listeners and CRL, enforced by a real mosquitto 2.0.

Every test runs against the SQLite registry and a PostgreSQL one. Clients connect with what
their enrollment files hold, exactly as a device or worker would."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

import pytest

from tandem.devices.fleet import load_enrollment
from tandem.protocol import InferenceRequest, InferenceResponse, Tensor, topics
from tandem.protocol.errors import PermissionDenied, TandemError
from tandem.protocol.messages import CloudLoad, DeviceStatus, new_request_id
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.transport import SyncTransport
from tests._support.broker import make_tls_files

pytestmark = pytest.mark.broker

PASSWORD_TLS, PASSWORD_PLAIN = 0, 1  # indexes in an enrollment's password_urls


def apply(fleet_broker) -> None:
    """Reload the broker as the CLI does after a change, and wait until it has."""
    before = fleet_broker.reloads()
    fleet_broker.fleet.broker_reload()
    fleet_broker.wait_reload(before)


def mqtt_client(config) -> SyncTransport:
    """A blocking MQTT client with ``config``."""
    return SyncTransport(MqttTransport(config))


def client(fleet, name: str, secrets: Path, *, auth: str = "certificate", url_index: int = 0,
           **overrides) -> SyncTransport:
    enrollment = load_enrollment(fleet.layout.enrollment(name))
    config = enrollment.transport_config(secrets / name, auth=auth, url_index=url_index,
                                         connect_timeout_s=3.0, reconnect_max_s=0.5)
    return mqtt_client(dataclasses.replace(config, **overrides))


def refused(transport: SyncTransport) -> TandemError:
    with pytest.raises(TandemError) as info:
        transport.connect()
    transport.close()
    return info.value


class Inbox:
    """Messages a handler received (on the transport's loop thread), with a condition."""

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.payloads: list[bytes] = []
        self._cond = threading.Condition()

    def __call__(self, msg) -> None:
        with self._cond:
            self.topics.append(msg.topic)
            self.payloads.append(bytes(msg.payload))
            self._cond.notify_all()

    def wait_for(self, topic: str, timeout_s: float = 5.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: topic in self.topics, timeout_s), \
                f"{topic} never arrived; got {self.topics}"


def echo_worker(name: str):
    def handle(request: InferenceRequest, context) -> InferenceResponse:
        return InferenceResponse(id=request.id, outputs=request.tensors, worker_id=name)

    return handle


def ask(device: SyncTransport, device_id: str) -> InferenceResponse:
    x = Tensor.from_array("x", __import__("numpy").arange(6, dtype="float32"))
    request = InferenceRequest(id=new_request_id(), device_id=device_id, model_digest="m",
                               cut_id=0, budget_ms=5000, tensors=(x,))
    return device.request(topics.request_topic(device_id, "model"), request)


@pytest.fixture
def enrolled(fleet, fleet_broker):
    fleet.add_device("cam-01", profile="jetson-orin-nano-8gb")
    fleet.add_device("cam-02", profile="cpu-x86_64")
    fleet.add_worker("gpu-1")
    apply(fleet_broker)
    return fleet


@pytest.mark.parametrize("auth,url_index", [("certificate", 0), ("password", PASSWORD_TLS),
                                            ("password", PASSWORD_PLAIN)])
def test_an_enrolled_device_is_served_by_a_worker(enrolled, tmp_path, auth, url_index):
    fleet = enrolled
    with client(fleet, "gpu-1", tmp_path, auth=auth, url_index=url_index) as worker, \
            client(fleet, "cam-01", tmp_path, auth=auth, url_index=url_index) as device:
        worker.serve(topics.request_filter("tandem-workers"), echo_worker("gpu-1"))
        response = ask(device, "cam-01")
    assert response.worker_id == "gpu-1"
    assert response.outputs[0].to_array().tolist() == list(range(6))


def test_a_wrong_password_is_refused(enrolled, tmp_path):
    for index in (PASSWORD_TLS, PASSWORD_PLAIN):
        error = refused(client(enrolled, "cam-01", tmp_path, auth="password", url_index=index,
                               password="not-the-password"))
        assert isinstance(error, PermissionDenied)
    # another device's password under this device's name
    other = load_enrollment(enrolled.layout.enrollment("cam-02")).password
    error = refused(client(enrolled, "cam-01", tmp_path, auth="password",
                           url_index=PASSWORD_PLAIN, password=other))
    assert isinstance(error, PermissionDenied)


def test_no_certificate_and_a_foreign_certificate_are_refused(enrolled, tmp_path):
    no_cert = client(enrolled, "cam-01", tmp_path)
    no_cert = mqtt_client(dataclasses.replace(no_cert.config, tls=dataclasses.replace(
        no_cert.config.tls, cert_file=None, key_file=None)))
    assert not no_cert.connected
    refused(no_cert)
    foreign = make_tls_files(tmp_path / "foreign")  # a client certificate of another CA
    t = client(enrolled, "cam-01", tmp_path)
    refused(mqtt_client(dataclasses.replace(t.config, tls=dataclasses.replace(
        t.config.tls, cert_file=str(foreign.client_cert_file),
        key_file=str(foreign.client_key_file)))))


def test_a_device_cannot_publish_into_another_devices_request_topic(enrolled, tmp_path):
    seen = Inbox()
    with client(enrolled, "gpu-1", tmp_path) as worker, \
            client(enrolled, "cam-01", tmp_path) as a:
        worker.subscribe(topics.request_filter("tandem-workers"), seen)
        a.publish(topics.request_topic("cam-02", "model"), b"forged", qos=1)
        a.publish(topics.request_topic("cam-02", "model"), b"forged", qos=0)
        a.publish(topics.status_topic("cam-02"), b"forged", qos=1)
        a.publish(topics.request_topic("cam-01", "model"), b"mine", qos=1)
        seen.wait_for(topics.request_topic("cam-01", "model"))
    # the broker handles one connection's publishes in order: the forged ones came first
    assert seen.topics == [topics.request_topic("cam-01", "model")]


def test_a_device_cannot_read_another_devices_replies(enrolled, tmp_path):
    mine, theirs = Inbox(), Inbox()
    with client(enrolled, "gpu-1", tmp_path) as worker, \
            client(enrolled, "cam-01", tmp_path) as a, \
            client(enrolled, "cam-02", tmp_path) as b:
        b.subscribe(topics.response_topic("cam-02"), theirs)
        a.subscribe(topics.response_topic("cam-01"), mine)
        # mosquitto 2.0 may grant these subscriptions; what matters is what it delivers
        for flt in (topics.response_topic("cam-02"), "tandem/v1/resp/+", "#"):
            with contextlib.suppress(PermissionDenied):
                a.subscribe(flt, mine)
        worker.publish(topics.response_topic("cam-02"), b"for b", qos=1)
        worker.publish(topics.response_topic("cam-01"), b"for a", qos=1)
        mine.wait_for(topics.response_topic("cam-01"))
        theirs.wait_for(topics.response_topic("cam-02"))
    # (one copy per matching subscription and handler: the point is that B's never came)
    assert set(mine.payloads) == {b"for a"}
    assert set(mine.topics) == {topics.response_topic("cam-01")}
    assert theirs.payloads == [b"for b"]


def test_a_worker_may_write_replies_and_its_own_load_only(enrolled, tmp_path):
    enrolled.add_worker("gpu-2")
    admin_seen = Inbox()
    admin = load_enrollment(enrolled.layout.enrollment("tandem-admin"))
    with mqtt_client(admin.transport_config(tmp_path / "admin", auth="password")) as watcher, \
            client(enrolled, "gpu-1", tmp_path) as worker, \
            client(enrolled, "cam-01", tmp_path) as device:
        watcher.subscribe(f"{topics.PREFIX}/cloud/+/load", admin_seen)
        watcher.subscribe(f"{topics.PREFIX}/status/+", admin_seen)
        load = CloudLoad("gpu-2", 1)
        worker.publish_message(topics.load_topic("gpu-2"), load)  # another worker's: denied
        worker.publish_message(topics.status_topic("cam-01"), DeviceStatus("cam-01", "online",
                                                                           1))  # denied
        worker.publish(topics.assign_topic("cam-01"), b"x", qos=1)  # denied
        worker.publish_message(topics.load_topic("gpu-1"), CloudLoad("gpu-1", 2))
        admin_seen.wait_for(topics.load_topic("gpu-1"))
        device.publish_message(topics.status_topic("cam-01"),
                               DeviceStatus("cam-01", "online", 3))
        admin_seen.wait_for(topics.status_topic("cam-01"))
        got_by_admin = list(admin_seen.topics)
        worker_seen = Inbox()
        with contextlib.suppress(PermissionDenied):
            worker.subscribe(f"{topics.PREFIX}/assign/+", worker_seen)
        with contextlib.suppress(PermissionDenied):
            worker.subscribe(f"{topics.PREFIX}/status/+", worker_seen)
        worker.subscribe(topics.request_filter(), worker_seen)
        watcher.publish(topics.assign_topic("cam-01"), b"assignment", qos=1)
        watcher.publish(topics.status_topic("cam-01"), b"status", qos=1)
        device.publish(topics.request_topic("cam-01", "m"), b"request", qos=1)
        worker_seen.wait_for(topics.request_topic("cam-01", "m"))
    assert got_by_admin == [topics.load_topic("gpu-1"), topics.status_topic("cam-01")]
    assert worker_seen.topics == [topics.request_topic("cam-01", "m")]


def test_the_certificate_is_the_identity_whatever_username_is_sent(enrolled, tmp_path):
    """On the client-certificate listener the CN is the username: cam-01's certificate with
    username "cam-02" still may only use cam-01's topics."""
    seen = Inbox()
    with client(enrolled, "gpu-1", tmp_path) as worker, \
            client(enrolled, "cam-01", tmp_path, username="cam-02") as a:
        worker.subscribe(topics.request_filter("g"), seen)
        a.publish(topics.request_topic("cam-02", "model"), b"forged", qos=1)
        a.publish(topics.request_topic("cam-01", "model"), b"mine", qos=1)
        seen.wait_for(topics.request_topic("cam-01", "model"))
    assert seen.topics == [topics.request_topic("cam-01", "model")]


def test_a_removed_device_cannot_connect_after_the_reload(enrolled, fleet_broker, tmp_path):
    cert = load_enrollment(enrolled.layout.enrollment("cam-01"))
    sessions = [client(enrolled, "cam-01", tmp_path, auth=auth, url_index=i)
                for auth, i in (("certificate", 0), ("password", PASSWORD_PLAIN))]
    dropped = [threading.Event() for _ in sessions]
    for session, event in zip(sessions, dropped, strict=True):
        session.connect()
        session.add_connection_listener(lambda up, event=event: None if up else event.set())
    try:
        enrolled.remove("cam-01")
        apply(fleet_broker)
        # mosquitto re-checks connected clients on reload: both sessions are dropped
        for event in dropped:
            assert event.wait(10)
    finally:
        for session in sessions:
            session.close()
    assert not enrolled.layout.enrollment("cam-01").exists()
    # with the enrollment it had (the file is gone from the fleet directory)
    secrets = tmp_path / "kept"
    for auth, index in (("certificate", 0), ("password", PASSWORD_TLS),
                        ("password", PASSWORD_PLAIN)):
        error = refused(mqtt_client(cert.transport_config(secrets, auth=auth, url_index=index,
                                                         connect_timeout_s=3.0)))
        assert isinstance(error, TandemError)
        if auth == "password":
            assert isinstance(error, PermissionDenied)
    # the others are unaffected
    with client(enrolled, "cam-02", tmp_path):
        pass


def test_a_rotated_devices_old_credentials_fail_and_new_ones_work(enrolled, fleet_broker,
                                                                   tmp_path):
    old = load_enrollment(enrolled.layout.enrollment("cam-01"))
    enrolled.rotate("cam-01")
    apply(fleet_broker)
    new = load_enrollment(enrolled.layout.enrollment("cam-01"))
    assert new.password != old.password and new.cert_pem != old.cert_pem
    error = refused(mqtt_client(old.transport_config(tmp_path / "old", auth="password",
                                                   url_index=PASSWORD_PLAIN)))
    assert isinstance(error, PermissionDenied)
    refused(mqtt_client(old.transport_config(tmp_path / "old", auth="certificate")))
    for auth, index in (("certificate", 0), ("password", PASSWORD_TLS),
                        ("password", PASSWORD_PLAIN)):
        with mqtt_client(new.transport_config(tmp_path / "new", auth=auth, url_index=index)):
            pass


def test_tls_with_client_certificates_end_to_end_and_revocation(enrolled, fleet_broker,
                                                                tmp_path):
    """Device and worker both on the client-certificate listener; then the device's
    certificate is revoked (removal) and a new handshake with it fails."""
    with client(enrolled, "gpu-1", tmp_path) as worker, \
            client(enrolled, "cam-02", tmp_path) as device:
        worker.serve(topics.request_filter("tandem-workers"), echo_worker("gpu-1"))
        assert ask(device, "cam-02").worker_id == "gpu-1"
    revoked = client(enrolled, "cam-02", tmp_path)
    enrolled.remove("cam-02")
    apply(fleet_broker)
    refused(revoked)
    # the CRL lists the serial
    from cryptography import x509

    crl = x509.load_pem_x509_crl((enrolled.layout.auth_link / "crl.pem").read_bytes())
    serial = int(enrolled.show("cam-02")["certificates"][0]["serial"], 16)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
