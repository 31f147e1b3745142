"""``tandem cloud serve --enroll FILE``: a worker joins the fleet's broker with the enrollment
``tandem fleet add-worker`` wrote (its id, client certificate, CA, bundle-signing key), against
a real mosquitto running the fleet's generated listeners, password file and ACL."""

from __future__ import annotations

import shutil
import stat

import pytest

from tandem.cloud import load_config
from tandem.protocol import InvalidArgument
from tandem.protocol.mqtt import MqttTransport
from tandem.protocol.transport import SyncTransport
from tests.cloud.conftest import request_for, topic_for

pytest.importorskip("cryptography")


@pytest.fixture
def enrolled(tmp_path):
    """A fleet (SQLite) with device cam-01 and worker gpu-1: (fleet, ports)."""
    from tests.devices.fleet.conftest import init_fleet

    fleet, ports = init_fleet(tmp_path / "fleet", None)
    fleet.add_device("cam-01", profile="cpu-x86_64")
    fleet.add_worker("gpu-1")
    return fleet, ports


def test_an_enrollment_supplies_id_broker_certificate_and_bundle_key(enrolled, tmp_path):
    fleet, ports = enrolled
    enroll = fleet.layout.enroll_dir / "gpu-1.toml"
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    cfg = load_config({"repo": str(tmp_path)}, env={"TANDEM_ENROLL": str(enroll)},
                      secrets_dir=secrets)
    assert cfg.enroll == enroll and cfg.worker_id == "gpu-1"
    assert cfg.broker == f"mqtts://127.0.0.1:{ports.tls}"  # the client-certificate URL first
    assert cfg.username is None and cfg.password is None
    for path, marker in ((cfg.ca_file, "CERTIFICATE"), (cfg.cert_file, "CERTIFICATE"),
                         (cfg.key_file, "PRIVATE KEY"), (cfg.public_key, "PUBLIC KEY")):
        assert path is not None and path.parent == secrets
        assert f"-----BEGIN {marker}" in path.read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cfg.public_key.read_text() == fleet.layout.signing_pub.read_text()

    # explicit settings win; a password URL brings the password, not the certificate
    plain = f"mqtt://127.0.0.1:{ports.plain}"
    cfg = load_config({"repo": str(tmp_path), "enroll": str(enroll), "broker": plain,
                       "worker_id": "other"}, env={}, secrets_dir=secrets)
    assert (cfg.broker, cfg.worker_id, cfg.username) == (plain, "other", "gpu-1")
    assert cfg.password and cfg.cert_file is None and cfg.ca_file is None

    # in the config file, relative to it
    (tmp_path / "cloud.toml").write_text(
        '[cloud]\nrepo = "."\nenroll = "fleet/enroll/gpu-1.toml"\n')
    cfg = load_config({}, env={}, config_file=tmp_path / "cloud.toml", secrets_dir=secrets)
    assert cfg.enroll == enroll and cfg.worker_id == "gpu-1"


def test_a_device_enrollment_is_refused(enrolled, tmp_path):
    fleet, _ = enrolled
    with pytest.raises(InvalidArgument, match="enrolls a device, not a cloud worker"):
        load_config({"repo": str(tmp_path),
                     "enroll": str(fleet.layout.enroll_dir / "cam-01.toml")}, env={})


@pytest.mark.broker
def test_an_enrolled_worker_serves_a_device_over_tls(enrolled, tmp_path, mosquitto_factory,
                                                    serve_process, compiled):
    from tandem.devices.fleet import load_enrollment
    from tandem.protocol.bundle import sign_bundle
    from tests.devices.fleet.conftest import FleetBroker

    fleet, ports = enrolled
    fleet.ports = ports
    FleetBroker(mosquitto_factory(extra_config=f"include_dir {fleet.layout.broker_conf.parent}"),
                fleet)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(compiled["dynamic_batch"], repo / "signed")
    sign_bundle(repo / "signed", fleet.layout.signing_key)
    shutil.copytree(compiled["residual"], repo / "unsigned")  # not the fleet's: refused

    worker = serve_process("--enroll", str(fleet.layout.enroll_dir / "gpu-1.toml"),
                           "--repo", str(repo), env={"TANDEM_CONFIG": ""})
    worker.wait_for_log("worker gpu-1 serving")
    assert "rejected bundle" in worker.log() and "unsigned" in worker.log()

    device = load_enrollment(fleet.layout.enroll_dir / "cam-01.toml")
    with SyncTransport(MqttTransport(device.transport_config(tmp_path / "device"))) as t:
        request, expected = request_for(compiled["dynamic_batch"], 0, device="cam-01")
        response = t.request(topic_for(request, "dynamic_batch"), request, timeout_s=20)
    assert response.ok and response.id == request.id and response.worker_id == "gpu-1"
    got = {o.name: o.to_array() for o in response.outputs}
    for name, want in expected.items():
        assert got[name].shape == want.shape
        assert abs(got[name] - want).max() < 1e-3
    log = worker.log()
    assert f"mqtts://127.0.0.1:{ports.tls}" in log


def test_cloud_serve_help_names_enroll():
    from click.testing import CliRunner

    from tandem.cloud.cli import cloud_command

    out = CliRunner().invoke(cloud_command, ["serve", "--help"]).output
    assert "--enroll FILE" in out and "TANDEM_ENROLL" in out
