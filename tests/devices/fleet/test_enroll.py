"""Enrollment files and the fleet's small TOML writer: what the edge daemon and the cloud
endpoint read, and every way such a file can be wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem.devices.fleet import Enrollment, load_enrollment, parse_broker_url
from tandem.devices.fleet._toml import dumps
from tandem.protocol.errors import InvalidArgument

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PEM = {
    "ca": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "cert": "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n",
    "key": "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
    "pub": "-----BEGIN PUBLIC KEY-----\nMCow\n-----END PUBLIC KEY-----\n",
}


def sample(**changes) -> Enrollment:
    fields = dict(kind="device", id="cam-01", fleet="acme",
                  urls=("mqtts://broker.example:8883",),
                  password_urls=("mqtts://broker.example:8884", "mqtt://10.0.0.1"),
                  username="cam-01", password='p"w\\d', ca_pem=PEM["ca"],
                  cert_pem=PEM["cert"], key_pem=PEM["key"], bundle_public_key_pem=PEM["pub"],
                  profile="jetson-orin-nano-8gb", group="lobby",
                  issued_at="2025-01-01T00:00:00Z")
    fields.update(changes)
    return Enrollment(**fields)


def test_an_enrollment_round_trips(tmp_path):
    path = tmp_path / "cam-01.toml"
    path.write_text(sample().to_toml())
    assert load_enrollment(path) == sample()
    assert "'''\n-----BEGIN CERTIFICATE-----" in path.read_text()  # PEMs read as PEMs


def test_transport_configs_for_both_kinds_of_authentication(tmp_path):
    e = sample()
    cert = e.transport_config(tmp_path / "s", auth="certificate")
    assert (cert.host, cert.port, cert.client_id, cert.username) == \
        ("broker.example", 8883, "cam-01", None)
    assert Path(cert.tls.cert_file).read_text() == PEM["cert"]
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "s" / "cam-01.key.pem").stat().st_mode & 0o777 == 0o600
    pw = e.transport_config(tmp_path / "s", auth="password")
    assert (pw.port, pw.username, pw.password, pw.tls.cert_file) == \
        (8884, "cam-01", 'p"w\\d', None)
    plain = e.transport_config(tmp_path / "s", auth="password", url_index=1)
    assert (plain.host, plain.port, plain.tls) == ("10.0.0.1", 1883, None)
    with pytest.raises(InvalidArgument, match="out of range"):
        e.transport_config(tmp_path / "s", auth="password", url_index=2)
    with pytest.raises(InvalidArgument, match="needs mqtts"):
        sample(urls=("mqtt://x",)).transport_config(tmp_path / "s")
    with pytest.raises(InvalidArgument, match="no certificate broker URL"):
        sample(urls=()).transport_config(tmp_path / "s")


@pytest.mark.parametrize("url,expected", [
    ("mqtt://h", (False, "h", 1883)), ("mqtts://h", (True, "h", 8883)),
    ("mqtts://h:1", (True, "h", 1)), ("mqtt://[::1]:99", (False, "::1", 99)),
])
def test_broker_urls(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["http://h", "mqtt://", "mqtt://h:0x", "mqtt://u:p@h",
                                 "mqtt://h/path", "mqtt://h?x=1", "h:1883"])
def test_bad_broker_urls(url):
    with pytest.raises(InvalidArgument):
        parse_broker_url(url)


def _broken(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old,new,message", [
    ("format = 1", "format = 2", "format 2 is not supported"),
    ("format = 1", "format = true", "'format' must be a int"),
    ('kind = "device"', 'kind = "root"', "kind must be one of"),
    ('id = "cam-01"', 'id = "cam/01"', "must not contain"),
    ('id = "cam-01"', 'id = "$SYS"', "must not start"),
    ('id = "cam-01"', "id = 7", "'id' must be a str"),
    ('urls = ["mqtts://broker.example:8883"]', 'urls = ["http://x"]', "scheme"),
    ('urls = ["mqtts://broker.example:8883"]', "urls = [1]", "list of strings"),
    ("-----BEGIN PRIVATE KEY-----", "-----BEGIN NOTHING-----", "not a PEM private key"),
    ("-----BEGIN PUBLIC KEY-----", "-----BEGIN X-----", "not a PEM public key"),
    ("[bundles]", "[bundlez]", "missing 'bundles'"),
    ('username = "cam-01"', "", "missing 'username'"),
])
def test_a_bad_enrollment_names_the_file_and_the_problem(tmp_path, old, new, message):
    path = tmp_path / "e.toml"
    path.write_text(_broken(sample().to_toml(), old, new))
    with pytest.raises(InvalidArgument, match=message) as info:
        load_enrollment(path)
    assert str(path) in str(info.value)


def test_unreadable_enrollment_files(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_enrollment(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        load_enrollment(tmp_path / "bin.toml")
    (tmp_path / "big.toml").write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(InvalidArgument, match="over"):
        load_enrollment(tmp_path / "big.toml")
    (tmp_path / "bad.toml").write_text("a = [")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load_enrollment(tmp_path / "bad.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_enrollment(tmp_path / "dir.toml")


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.one_of(
    st.text(max_size=50), st.integers(-(2**63), 2**63 - 1), st.booleans(),
    st.lists(st.text(max_size=20), max_size=4)), max_size=6))
def test_the_toml_writer_round_trips_whatever_it_is_given(doc):
    text = dumps({"top": doc, "scalar": "x"})
    assert tomllib.loads(text) == {"scalar": "x", "top": doc}
