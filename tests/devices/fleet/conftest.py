"""Fixtures for the fleet tests: a registry on SQLite and on the PostgreSQL server of
127.0.0.1:5432 (a database of our own per test, dropped after), a fleet initialized in a temporary
directory with free ports on 127.0.0.1, and a real mosquitto running that fleet's generated
listeners, password file, ACL and CRL."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._support.broker import Mosquitto, free_port

PG_ADMIN_URL = os.environ.get("TANDEM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_REQUIRED = os.environ.get("TANDEM_REQUIRE_POSTGRES") == "1"  # set by .ci/run


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)


def postgres_available() -> str | None:
    """None when the PostgreSQL test server answers, else why not."""
    try:
        with _pg_admin():
            return None
    except Exception as exc:  # psycopg missing, server down, auth refused
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"


@pytest.fixture(scope="session")
def pg_database():
    """A database of our own (``fleet_tests_<random>``) for this test session, dropped after;
    None (with the reason) when the server cannot be reached."""
    why = postgres_available()
    if why is not None:
        yield None, why
        return
    name = f"fleet_tests_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}", None
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database):
    """A fresh PostgreSQL schema in the session's database (a URL whose search_path is it),
    dropped when the test ends: creating a schema is much faster than a database."""
    import psycopg

    url, why = pg_database
    if url is None:
        if PG_REQUIRED:
            pytest.fail(f"PostgreSQL test server {PG_ADMIN_URL} unreachable: {why}")
        pytest.skip(f"PostgreSQL test server {PG_ADMIN_URL} unreachable ({why}); "
                    ".ci/run starts it")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{url}?options=-csearch_path%3D{schema}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str | None:
    """None (the fleet directory's SQLite file) or a PostgreSQL database URL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")


@dataclass
class FleetPorts:
    tls: int
    password: int
    plain: int


def init_fleet(directory: Path, db_url: str | None, **options):
    from tandem.devices.fleet import Fleet

    chosen: list[int] = []
    while len(chosen) < 3:  # free_port() may hand out the same port twice in a row
        port = free_port()
        if port not in chosen:
            chosen.append(port)
    ports = FleetPorts(*chosen)
    options.setdefault("broker_hosts", ("127.0.0.1", "localhost"))
    options.setdefault("pid_file", str(directory.parent / "broker.pid"))
    fleet, _ = Fleet.init(directory, name="testfleet", db_url=db_url, bind="127.0.0.1",
                          tls_port=ports.tls, password_port=ports.password,
                          plain_port=ports.plain, **options)
    return fleet, ports


@pytest.fixture
def fleet(tmp_path, db_url):
    """A fresh fleet in tmp_path/fleet (pid file tmp_path/broker.pid), on both databases."""
    fleet, ports = init_fleet(tmp_path / "fleet", db_url)
    fleet.ports = ports
    return fleet


def _wait_port(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # polling interval of the readiness probe


class FleetBroker:
    """A real mosquitto with the fleet's listeners (include_dir of its conf.d), its pid in the
    fleet's pid file so that fleet commands reload it."""

    def __init__(self, broker: Mosquitto, fleet) -> None:
        self.broker = broker
        self.fleet = fleet
        self.ports = fleet.ports
        self._write_pid()

    def _write_pid(self) -> None:
        Path(self.fleet.settings.pid_file).write_text(f"{self.broker.pid}\n")
        deadline = time.monotonic() + 10
        for port in (self.ports.tls, self.ports.password, self.ports.plain):
            _wait_port(port, deadline)

    def reloads(self) -> int:
        return len(re.findall(r"Reloading config", self.broker.log_path.read_text(
            errors="replace")))

    def wait_reload(self, before: int, timeout_s: float = 10.0) -> None:
        """Wait until the broker has logged a reload after ``before`` reloads."""
        deadline = time.monotonic() + timeout_s
        while self.reloads() <= before:
            assert time.monotonic() < deadline, "the broker did not reload:\n" + \
                self.broker.log_tail()
            time.sleep(0.01)  # polling interval of the log probe

    def restart(self) -> None:
        self.broker.stop()
        self.broker.start()
        self._write_pid()


@pytest.fixture
def fleet_broker(fleet, mosquitto_factory) -> FleetBroker:
    broker = mosquitto_factory(extra_config=(
        "log_type information\n"
        f"include_dir {fleet.layout.broker_conf.parent}"))
    return FleetBroker(broker, fleet)


@pytest.fixture(scope="session")
def compiled_bundle(tmp_path_factory) -> Path:
    """An unsigned bundle compiled from the example CNN (copy it before changing it)."""
    from tandem.compiler import BundleFromOnnx, CompileOptions
    from tandem.compiler.examples import cnn_chain, save

    root = tmp_path_factory.mktemp("compiled")
    save(cnn_chain(), root / "model.onnx")
    BundleFromOnnx(root / "model.onnx", root / "bundle",
                   CompileOptions(targets=("onnxruntime",)))()
    return root / "bundle"
