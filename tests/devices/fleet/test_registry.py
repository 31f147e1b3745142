"""The registry and the files that follow it, on SQLite and PostgreSQL: one transaction per
command, bad input refused with nothing changed, failures injected at every step, migrations,
credentials stored only as mosquitto hashes."""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import threading
from pathlib import Path

import pytest

from tandem.devices.fleet import (
    Fleet,
    _db,
    _fleet,
    _pki,
    _staging,
    load_enrollment,
    verify_password,
)
from tandem.devices.fleet._migrations import LATEST
from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TandemError,
    Unavailable,
)
from tests._support.broker import mosquitto_passwd_binary
from tests.devices.fleet.conftest import init_fleet

TABLES = ("fleet", "fleet_groups", "clients", "certificates", "bundles", "assignments",
          "events", "schema_migrations")


def snapshot(fleet: Fleet) -> dict:
    """Every row of every table and every file of the fleet directory (bytes, links)."""
    def rows(tx):
        return {t: sorted(tuple(sorted(r.items())) for r in tx.all(f"SELECT * FROM {t}"))
                for t in TABLES}

    files = {}
    for path in sorted(fleet.layout.root.rglob("*")):
        rel = str(path.relative_to(fleet.layout.root))
        if rel in ("registry.db", ".lock") or rel.startswith("registry.db-"):
            continue
        if path.is_symlink():
            files[rel] = ("link", os.readlink(path))
        elif path.is_file():
            files[rel] = path.read_bytes()
        else:
            files[rel] = "dir"
    return {"rows": fleet._read(rows), "files": files}


def passwd_users(fleet: Fleet) -> dict[str, str]:
    text = (fleet.layout.auth_link / "passwd").read_text()
    return dict(line.split(":", 1) for line in text.splitlines())


# -- init --------------------------------------------------------------------------------------


def test_init_creates_the_registry_ca_keys_and_auth_files(fleet):
    layout = fleet.layout
    for path in (layout.settings, layout.ca_cert, layout.ca_key, layout.server_cert,
                 layout.server_key, layout.signing_key, layout.signing_pub, layout.broker_conf,
                 layout.auth_link / "passwd", layout.auth_link / "acl",
                 layout.auth_link / "crl.pem", layout.enrollment("tandem-admin")):
        assert path.is_file(), path
    for secret in (layout.ca_key, layout.server_key, layout.signing_key,
                   layout.enrollment("tandem-admin"), layout.settings):
        assert secret.stat().st_mode & 0o077 == 0, secret
    assert set(passwd_users(fleet)) == {"tandem-admin"}
    conf = layout.broker_conf.read_text()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert f"crlfile {layout.auth_link / 'crl.pem'}" in conf
    assert fleet._read(lambda tx: fleet.db.schema_version(tx)) == LATEST
    assert not list(layout.root.parent.glob(".fleet.init-*"))  # staging gone


def test_init_refuses_an_existing_fleet_and_a_database_holding_one(fleet, tmp_path, db_url):
    with pytest.raises(FailedPrecondition, match="already a fleet directory"):
        init_fleet(fleet.layout.root, db_url)
    if db_url is not None:  # another directory, the same PostgreSQL database
        with pytest.raises(FailedPrecondition, match="already holds fleet 'testfleet'"):
            init_fleet(tmp_path / "other", db_url)
        assert not (tmp_path / "other").exists()
        assert not list(tmp_path.glob(".other.init-*"))


def test_init_into_a_non_empty_directory_keeps_what_is_there(tmp_path):
    root = tmp_path / "ops"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    fleet, _ = init_fleet(root, None)
    assert (root / "notes.txt").read_text() == "mine"
    assert fleet.layout.settings.is_file()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "ca").mkdir()
    with pytest.raises(FailedPrecondition, match="already holds ca"):
        init_fleet(tmp_path / "busy", None)


def test_init_with_an_unreachable_database_leaves_nothing(tmp_path):
    with pytest.raises(Unavailable, match="unreachable") as info:
        init_fleet(tmp_path / "fleet", "postgresql://fleetuser:s3cret@127.0.0.1:1/nowhere")
    assert "s3cret" not in str(info.value)
    assert not (tmp_path / "fleet").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("name", ["bad/name", "bad name", "$bad", "a+b", "a#b", "x" * 65])
def test_init_refuses_a_bad_fleet_name(tmp_path, name):
    with pytest.raises(InvalidArgument):
        Fleet.init(tmp_path / "f", name=name)
    assert not (tmp_path / "f").exists()


# -- add / bad input ---------------------------------------------------------------------------


def test_add_stores_only_a_mosquitto_hash_and_writes_the_enrollment(fleet):
    fleet.add_group("lobby")
    result = fleet.add_device("cam-01", profile="jetson-orin-nano-8gb", group="lobby")
    path = fleet.layout.enrollment("cam-01")
    assert result.files == [path]
    assert path.stat().st_mode & 0o777 == 0o600
    enrollment = load_enrollment(path)
    assert (enrollment.id, enrollment.kind, enrollment.profile, enrollment.group) == \
        ("cam-01", "device", "jetson-orin-nano-8gb", "lobby")
    # the registry and the password file hold the hash, never the password
    stored = fleet._read(lambda tx: tx.one(
        "SELECT password_hash FROM clients WHERE name = 'cam-01'"))["password_hash"]
    assert stored.startswith("$7$101$") and verify_password(enrollment.password, stored)
    assert passwd_users(fleet)["cam-01"] == stored
    everything = repr(snapshot(fleet)["rows"])
    assert enrollment.password not in everything
    assert enrollment.password not in (fleet.layout.auth_link / "passwd").read_text()
    acl = (fleet.layout.auth_link / "acl").read_text()
    assert "user cam-01\ntopic write tandem/v1/req/cam-01/+\n" in acl


@pytest.mark.parametrize("device", ["cam/01", "cam+", "cam#", "$SYS", "cam 01", "cam\x00",
                                    "cam\n01", "", "-cam", "cam:01", "x" * 65, "é"])
def test_a_device_id_that_is_not_safe_is_refused_with_nothing_changed(fleet, device):
    before = snapshot(fleet)
    with pytest.raises(InvalidArgument):
        fleet.add_device(device, profile="cpu-x86_64")
    assert snapshot(fleet) == before


def test_duplicate_unknown_profile_and_unknown_group_change_nothing(fleet):
    fleet.add_device("cam-01", profile="cpu-x86_64")
    before = snapshot(fleet)
    with pytest.raises(FailedPrecondition, match="already enrolled"):
        fleet.add_device("cam-01", profile="cpu-x86_64")
    with pytest.raises(FailedPrecondition, match="already enrolled"):
        fleet.add_worker("cam-01")
    with pytest.raises(FailedPrecondition, match="already enrolled"):
        fleet.add_device("tandem-admin", profile="cpu-x86_64")
    with pytest.raises(NotFound, match="no device profile 'cpu-x86'; did you mean cpu-x86_64"):
        fleet.add_device("cam-02", profile="cpu-x86")
    with pytest.raises(NotFound, match="no group 'lobby'"):
        fleet.add_device("cam-02", profile="cpu-x86_64", group="lobby")
    with pytest.raises(NotFound):
        fleet.remove("cam-99")
    with pytest.raises(NotFound):
        fleet.rotate("cam-99")
    with pytest.raises(FailedPrecondition, match="admin"):
        fleet.remove("tandem-admin")
    assert snapshot(fleet) == before


# -- failure injection -------------------------------------------------------------------------


def _fail(*_args, **_kwargs):
    raise Unavailable("injected failure")


def _failing_commit(monkeypatch) -> None:
    """Every transaction fails at its commit (the body ran, then the database says no)."""
    original = _db.Database.transaction

    @contextlib.contextmanager
    def transaction(self, **kwargs):
        with original(self, **kwargs) as tx:
            yield tx
            raise Unavailable("injected: commit failed")

    monkeypatch.setattr(_db.Database, "transaction", transaction)


@pytest.mark.parametrize("step", ["certificate", "event", "auth files", "crl", "enrollment",
                                  "commit"])
def test_a_failure_at_any_step_of_add_leaves_nothing_half_written(fleet, monkeypatch, step):
    fleet.add_device("cam-01", profile="cpu-x86_64")
    before = snapshot(fleet)
    with monkeypatch.context() as m:
        if step == "certificate":
            m.setattr(_pki.Authority, "issue_client", _fail)
        elif step == "event":
            m.setattr(_fleet, "_event", _fail)
        elif step == "auth files":
            m.setattr(_fleet, "stage_auth", _fail)
        elif step == "crl":
            m.setattr(_pki.Authority, "crl", _fail)
        elif step == "enrollment":
            m.setattr(_fleet, "stage_file", _fail)
        else:
            _failing_commit(m)
        with pytest.raises(Unavailable, match="injected"):
            fleet.add_device("cam-02", profile="cpu-x86_64")
    assert snapshot(fleet) == before
    # and the fleet still works afterwards
    fleet.add_device("cam-02", profile="cpu-x86_64")
    assert set(passwd_users(fleet)) == {"tandem-admin", "cam-01", "cam-02"}


@pytest.mark.parametrize("command", ["remove", "rotate", "add_worker", "add_group"])
def test_a_failed_commit_of_any_command_changes_nothing(fleet, monkeypatch, command):
    fleet.add_device("cam-01", profile="cpu-x86_64")
    before = snapshot(fleet)
    with monkeypatch.context() as m:
        _failing_commit(m)
        with pytest.raises(Unavailable, match="injected"):
            {"remove": lambda: fleet.remove("cam-01"),
             "rotate": lambda: fleet.rotate("cam-01"),
             "add_worker": lambda: fleet.add_worker("gpu-1"),
             "add_group": lambda: fleet.add_group("lobby")}[command]()
    assert snapshot(fleet) == before


def test_a_crash_after_the_commit_is_repaired_by_the_next_command_or_sync(fleet, monkeypatch):
    """The registry committed but the new auth files were not switched in: the command says
    so, the fleet knows its files lag, and `sync` (or any later change) brings them up."""
    with monkeypatch.context() as m:
        def disk_full(self):
            raise OSError(28, "No space left on device")

        m.setattr(_staging.StagedAuth, "install", disk_full)
        with pytest.raises(Unavailable, match="tandem fleet sync"):
            fleet.add_device("cam-01", profile="cpu-x86_64")
    assert fleet.auth_lagging()
    assert "cam-01" not in passwd_users(fleet)
    assert "cam-01" in {c["name"] for c in fleet.clients()}
    fleet.sync()
    assert not fleet.auth_lagging()
    assert "cam-01" in passwd_users(fleet)


def test_auth_generations_are_swapped_whole_and_old_ones_pruned(fleet):
    for i in range(6):
        fleet.add_device(f"cam-{i}", profile="cpu-x86_64")
    mosquitto = fleet.layout.mosquitto_dir
    generations = sorted(p.name for p in mosquitto.glob("auth.*"))
    assert len(generations) == _staging.KEEP_GENERATIONS
    assert os.readlink(fleet.layout.auth_link) == generations[-1]
    assert not [p for p in mosquitto.iterdir() if p.name.startswith(".")]
    assert not [p for p in fleet.layout.enroll_dir.iterdir() if p.name.startswith(".")]


def test_concurrent_commands_serialize(fleet):
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            fleet.add_device(f"cam-{i}", profile="cpu-x86_64")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert set(passwd_users(fleet)) == {"tandem-admin"} | {f"cam-{i}" for i in range(6)}
    generation = fleet._read(lambda tx: tx.scalar("SELECT auth_generation FROM fleet"))
    assert generation == 7 and not fleet.auth_lagging()


# -- remove, rotate, groups --------------------------------------------------------------------


def test_remove_revokes_and_forgets(fleet):
    from cryptography import x509

    fleet.add_device("cam-01", profile="cpu-x86_64")
    serial = fleet.show("cam-01")["cert_serial"]
    fleet.remove("cam-01")
    assert "cam-01" not in passwd_users(fleet)
    assert "user cam-01" not in (fleet.layout.auth_link / "acl").read_text()
    crl = x509.load_pem_x509_crl((fleet.layout.auth_link / "crl.pem").read_bytes())
    ca = x509.load_pem_x509_certificate(fleet.layout.ca_cert.read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    assert not fleet.layout.enrollment("cam-01").exists()
    info = fleet.show("cam-01")
    assert info["state"] == "removed" and info["acl"] == []
    assert info["certificates"][0]["revoke_reason"] == "removed"
    assert [c["name"] for c in fleet.clients(include_removed=True) if c["state"] == "removed"] \
        == ["cam-01"]
    # the id can be enrolled again, with new credentials
    fleet.add_device("cam-01", profile="cpu-x86_64")
    assert fleet.show("cam-01")["cert_serial"] != serial


def test_rotate_replaces_password_and_certificate(fleet):
    fleet.add_device("cam-01", profile="cpu-x86_64")
    old = load_enrollment(fleet.layout.enrollment("cam-01"))
    old_hash = passwd_users(fleet)["cam-01"]
    fleet.rotate("cam-01")
    new = load_enrollment(fleet.layout.enrollment("cam-01"))
    assert new.password != old.password and new.key_pem != old.key_pem
    new_hash = passwd_users(fleet)["cam-01"]
    assert new_hash != old_hash
    assert verify_password(new.password, new_hash)
    assert not verify_password(old.password, new_hash)
    certs = fleet.show("cam-01")["certificates"]
    assert [c["revoke_reason"] for c in certs] == [None, "superseded"]


def test_groups(fleet):
    fleet.add_group("lobby")
    with pytest.raises(FailedPrecondition, match="exists"):
        fleet.add_group("lobby")
    fleet.add_device("cam-01", profile="cpu-x86_64", group="lobby")
    assert [(g["name"], g["devices"]) for g in fleet.groups()] == [("lobby", 1)]
    with pytest.raises(FailedPrecondition, match="still has 1 device"):
        fleet.remove_group("lobby")
    fleet.remove("cam-01")
    fleet.remove_group("lobby")
    assert fleet.groups() == []
    with pytest.raises(NotFound):
        fleet.remove_group("lobby")


# -- migrations and the database boundary -------------------------------------------------------


def test_a_registry_from_a_newer_tandem_is_refused(fleet):
    with fleet.db.transaction() as tx:
        tx.execute("INSERT INTO schema_migrations (version, name, applied_ms) "
                   "VALUES (?, 'future', 0)", (LATEST + 1,))
    with pytest.raises(FailedPrecondition, match="newer than this Tandem"):
        fleet.clients()


def test_migrations_apply_once_and_in_order(tmp_path, db_url):
    url = db_url or f"sqlite:///{tmp_path / 'r.db'}"
    db = _db.Database.open(url)
    steps = [(1, "one", ["CREATE TABLE t1 (a INTEGER)"]),
             (2, "two", ["CREATE TABLE t2 (id {auto_id}, b TEXT)"])]
    with db.transaction(create=True) as tx:
        assert db.migrate(tx, steps[:1]) == [1]
    with db.transaction() as tx:
        assert db.migrate(tx, steps) == [2]
        assert db.migrate(tx, steps) == []
        tx.execute("INSERT INTO t2 (b) VALUES (?)", ("x",))
        assert tx.one("SELECT id, b FROM t2") == {"id": 1, "b": "x"}
        assert db.schema_version(tx) == 2
    # a failing migration is rolled back whole
    with pytest.raises(TandemError), db.transaction() as tx:
        db.migrate(tx, [*steps, (3, "bad", ["CREATE TABLE t3 (a INTEGER)", "NOT SQL"])])
    with db.transaction() as tx:
        assert db.schema_version(tx) == 2 and not tx.table_exists("t3")


def test_an_unreachable_or_missing_registry_is_one_clear_error(fleet, tmp_path):
    with pytest.raises(Unavailable, match="unreachable") as info:
        Fleet.open(fleet.layout.root, "postgresql://u:pw@127.0.0.1:1/x").clients()
    assert "pw@" not in str(info.value)
    with pytest.raises(NotFound, match="not a fleet directory"):
        Fleet.open(tmp_path / "nowhere")
    with pytest.raises(InvalidArgument, match="unsupported database URL"):
        Fleet.open(fleet.layout.root, "mysql://x/y")
    empty = tmp_path / "empty.db"
    with pytest.raises(NotFound, match="no fleet registry"):
        Fleet.open(fleet.layout.root, f"sqlite:///{empty}").clients()
    assert not empty.exists()


def test_a_damaged_settings_file_is_one_clear_error(fleet):
    fleet.layout.settings.write_text("format = 1\nname = 3\n")
    with pytest.raises(InvalidArgument, match=r"fleet\.toml"):
        Fleet.open(fleet.layout.root)
    fleet.layout.settings.write_text("not toml [")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        Fleet.open(fleet.layout.root)


# -- mosquitto_passwd compatibility ------------------------------------------------------------


@pytest.mark.skipif(mosquitto_passwd_binary() is None, reason="mosquitto_passwd not installed")
def test_hashes_are_what_mosquitto_passwd_writes(tmp_path):
    from tandem.devices.fleet import hash_password

    pw_file = tmp_path / "pw"
    pw_file.write_text("alice:correct horse\n")
    subprocess.run([mosquitto_passwd_binary(), "-U", str(pw_file)], check=True, timeout=10)
    theirs = pw_file.read_text().strip().split(":", 1)[1]
    _, kind, iterations, salt, derived = theirs.split("$")
    assert (kind, iterations) == ("7", "101")
    assert verify_password("correct horse", theirs)
    assert not verify_password("wrong", theirs)
    # the same salt gives the same hash, byte for byte
    assert hash_password("correct horse", salt=base64.b64decode(salt)) == theirs
    assert len(base64.b64decode(derived)) == 64


def test_enrollment_files_load_and_carry_the_fleet_keys(fleet):
    fleet.add_worker("gpu-1")
    e = load_enrollment(fleet.layout.enrollment("gpu-1"))
    assert e.kind == "worker" and e.fleet == "testfleet"
    assert e.ca_pem == fleet.layout.ca_cert.read_text()
    assert e.bundle_public_key_pem == fleet.layout.signing_pub.read_text()
    assert e.urls == (f"mqtts://127.0.0.1:{fleet.ports.tls}",)
    assert e.password_urls == (f"mqtts://127.0.0.1:{fleet.ports.password}",
                               f"mqtt://127.0.0.1:{fleet.ports.plain}")
    assert Path(fleet.layout.enrollment("gpu-1")).read_text().startswith("# Tandem enrollment")


def test_an_expiring_crl_is_warned_about_and_sync_renews_it(fleet, monkeypatch):
    assert fleet.crl_expiry_warning() == ""
    with monkeypatch.context() as m:
        original = _pki.Authority.crl
        m.setattr(_pki.Authority, "crl",
                  lambda self, revoked, days=10: original(self, revoked, days=days))
        fleet.sync()
    assert "expires" in fleet.crl_expiry_warning()
    fleet.sync()
    assert fleet.crl_expiry_warning() == ""


def test_a_stale_pid_file_naming_another_process_is_not_signalled(fleet):
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        Path(fleet.settings.pid_file).write_text(f"{other.pid}\n")
        with pytest.raises(Unavailable, match="not mosquitto; the pid file is stale"):
            fleet.broker_reload()
        assert other.poll() is None  # still running: no SIGHUP was sent
    finally:
        other.kill()
        other.wait()
    Path(fleet.settings.pid_file).write_text(f"{other.pid}\n")  # gone now
    with pytest.raises(Unavailable, match="is mosquitto running"):
        fleet.broker_reload()
