"""The fleet: registry changes, credentials, certificates and the broker's auth files together.

Every command is one database transaction. Files that change with it (enrollment files, the
broker's password/ACL/CRL set) are staged completely before the commit and installed after it
(:mod:`._staging`); a failure before the commit leaves the database and every file as they were.
Commands that change the fleet hold ``fleet/.lock`` (so two operators on one machine never
interleave) and the database's write lock (so two machines sharing a PostgreSQL never do).

If a process dies between the commit and the installation, the auth files lag the registry by
one change; the next command that writes them, or ``tandem fleet sync``, rewrites them from the
registry (the generation number in the database says which version is current).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tandem.devices.fleet import _auth, _pki
from tandem.devices.fleet._db import Database, Transaction
from tandem.devices.fleet._enroll import Enrollment
from tandem.devices.fleet._ids import check_name
from tandem.devices.fleet._migrations import LATEST, MIGRATIONS
from tandem.devices.fleet._settings import DEFAULT_DIR, FleetSettings, Layout, read_settings
from tandem.devices.fleet._staging import (
    StagedAuth,
    StagedFile,
    StagedRemoval,
    current_generation,
    stage_auth,
    stage_file,
    write_new,
)
from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

__all__ = ["ADMIN_NAME", "ChangeResult", "Fleet", "assignment_message", "now_ms"]

ADMIN_NAME = "tandem-admin"
_T = TypeVar("_T")
_Staged = StagedFile | StagedAuth | StagedRemoval


def now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int | None) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ChangeResult:
    """What a command changed, for the CLI to report."""

    message: str
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class _Change:
    """Staged files of one command, installed after its commit."""

    def __init__(self) -> None:
        self.staged: list[_Staged] = []
        self.auth_changed = False

    def add(self, staged: _Staged) -> None:
        self.staged.append(staged)

    def discard(self) -> None:
        for s in self.staged:
            with contextlib.suppress(OSError):
                s.discard()

    def install(self) -> None:
        for i, s in enumerate(self.staged):
            try:
                s.install()
            except OSError as exc:
                for rest in self.staged[i + 1:]:
                    with contextlib.suppress(OSError):
                        rest.discard()
                raise Unavailable(
                    f"the registry is updated but a file could not be installed ({exc}); "
                    "run 'tandem fleet sync' to rewrite the fleet's files") from exc


class Fleet:
    """A fleet directory and its registry. Construct with :meth:`open` (existing) or
    :meth:`init` (new)."""

    def __init__(self, layout: Layout, settings: FleetSettings, db: Database) -> None:
        self.layout = layout
        self.settings = settings
        self.db = db

    # -- opening -------------------------------------------------------------------------------

    @staticmethod
    def _database(layout: Layout, db_url: str | None, settings_url: str = "") -> Database:
        url = db_url or os.environ.get("TANDEM_FLEET_DB") or settings_url
        return Database.open(url) if url else Database.open(f"sqlite:///{layout.registry}")

    @classmethod
    def open(cls, directory: Path | str = DEFAULT_DIR, db_url: str | None = None) -> Fleet:
        layout = Layout(Path(directory).absolute())
        settings = read_settings(layout)
        return cls(layout, settings, cls._database(layout, db_url, settings.db_url))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        try:
            fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise Unavailable(f"cannot lock the fleet directory {self.layout.root}: "
                              f"{exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _check_schema(self, tx: Transaction) -> None:
        version = self.db.schema_version(tx)
        if version == 0 or not tx.table_exists("fleet"):
            raise NotFound(f"database {self.db.display_url} holds no fleet registry "
                           "(run 'tandem fleet init')")
        if version != LATEST:
            tx.lock()
            self.db.migrate(tx, MIGRATIONS)  # older: upgraded here; newer: refused
        row = tx.one("SELECT name FROM fleet WHERE id = 1")
        if row is None:
            raise NotFound(f"database {self.db.display_url} holds no fleet registry")
        if row["name"] != self.settings.name:
            raise FailedPrecondition(
                f"database {self.db.display_url} holds fleet {row['name']!r}, but "
                f"{self.layout.root} is fleet {self.settings.name!r}")

    def _read(self, fn: Callable[[Transaction], _T]) -> _T:
        with self.db.transaction(write=False) as tx:
            self._check_schema(tx)
            return fn(tx)

    def _change(self, fn: Callable[[Transaction, _Change], _T], *, auth: bool) -> _T:
        """Run ``fn`` in one transaction; with ``auth`` the auth files are regenerated (and in
        any case when they lag the registry). Staged files are installed after the commit."""
        with self._lock():
            change = _Change()
            try:
                with self.db.transaction() as tx:
                    self._check_schema(tx)
                    result = fn(tx, change)
                    lagging = self._auth_generation(tx) != current_generation(
                        self.layout.auth_link)
                    if auth or lagging:
                        change.add(self._stage_auth(tx, bump=auth))
                        change.auth_changed = True
            except BaseException:
                change.discard()
                raise
            change.install()
            return result

    # -- the auth files ------------------------------------------------------------------------

    def _auth_generation(self, tx: Transaction) -> int:
        return int(tx.scalar("SELECT auth_generation FROM fleet WHERE id = 1"))

    def _authority(self) -> _pki.Authority:
        return _pki.load_authority(self.layout.ca_key, self.layout.ca_cert)

    def _stage_auth(self, tx: Transaction, *, bump: bool = True) -> StagedAuth:
        generation = self._auth_generation(tx) + (1 if bump else 0)
        if bump:
            tx.execute("UPDATE fleet SET auth_generation = ? WHERE id = 1", (generation,))
        return stage_auth(self.layout.auth_link, generation,
                          _auth_files(tx, self._authority(), self.settings.name, generation))

    def broker_reload(self) -> str:
        """Tell the broker to re-read its auth files; a one-line account of what was done.
        Raises Unavailable when the configured method fails."""
        s = self.settings
        if s.pid_file:
            try:
                text = Path(s.pid_file).read_text().strip()
                pid = int(text)
            except (OSError, ValueError) as exc:
                raise Unavailable(f"cannot reload the broker: pid file {s.pid_file}: {exc}") \
                    from exc
            # a stale pid file can name another process by now: SIGHUP would end most of them
            comm = Path(f"/proc/{pid}/comm")
            if Path("/proc/self/comm").exists():  # Linux: check what the pid is
                try:
                    name = comm.read_text().strip()
                except OSError:
                    raise Unavailable(f"cannot reload the broker: no process {pid} (from "
                                      f"{s.pid_file}); is mosquitto running?") from None
                if "mosquitto" not in name:
                    raise Unavailable(f"cannot reload the broker: pid {pid} (from {s.pid_file}) "
                                      f"is {name!r}, not mosquitto; the pid file is stale")
            try:
                os.kill(pid, signal.SIGHUP)
            except OSError as exc:
                raise Unavailable(f"cannot reload the broker (pid {pid} from {s.pid_file}): "
                                  f"{exc.strerror or exc}") from exc
            return f"broker reloaded (SIGHUP to pid {pid})"
        if s.reload_command:
            try:
                proc = subprocess.run(list(s.reload_command), capture_output=True, text=True,
                                      timeout=60, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise Unavailable(f"cannot reload the broker: {' '.join(s.reload_command)}: "
                                  f"{exc}") from exc
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                raise Unavailable(f"broker reload command exited with {proc.returncode}: "
                                  f"{tail[0]}")
            return f"broker reloaded ({' '.join(s.reload_command)})"
        return ("reload the broker to apply this (e.g. kill -HUP <mosquitto pid>; set "
                "broker.pid_file or broker.reload_command in fleet.toml to do it here)")

    # -- init ----------------------------------------------------------------------------------

    @classmethod
    def init(cls, directory: Path | str = DEFAULT_DIR, *, name: str | None = None,
             db_url: str | None = None, broker_hosts: Sequence[str] = ("localhost",),
             bind: str = "", tls_port: int = 8883, password_port: int = 8884,
             plain_port: int = 0, pid_file: str = "", reload_command: Sequence[str] = (),
             bundle_base_url: str = "") -> tuple[Fleet, ChangeResult]:
        """Create a fleet: registry, CA, broker certificate, bundle-signing keys, the admin
        client's enrollment and the broker's auth files. Nothing is left behind on failure."""
        from tandem.protocol.bundle import generate_keypair

        root = Path(directory).absolute()
        name = name or root.name
        settings = FleetSettings(
            name=check_name(name, "fleet name"), broker_hosts=tuple(broker_hosts), bind=bind,
            tls_port=tls_port, password_port=password_port, plain_port=plain_port,
            db_url=db_url or "", pid_file=pid_file, reload_command=tuple(reload_command),
            bundle_base_url=bundle_base_url.rstrip("/"))
        final = Layout(root)
        if final.settings.exists():
            raise FailedPrecondition(f"{root} is already a fleet directory")
        if root.exists() and not root.is_dir():
            raise InvalidArgument(f"{root} exists and is not a directory")
        ours = ("fleet.toml", "registry.db", "ca", "broker", "signing", "enroll", "mosquitto",
                "bundles")
        if root.is_dir():
            clash = [n for n in ours if (root / n).exists() or (root / n).is_symlink()]
            if clash:
                raise FailedPrecondition(f"{root} already holds {', '.join(clash)}: "
                                         "init needs a new or empty directory")
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.init-", dir=root.parent))
        stage = Layout(staging)
        # the registry URL the final fleet uses; a default SQLite file is created in staging
        db = Database.open(db_url) if db_url else Database.open(f"sqlite:///{stage.registry}")
        try:
            authority = _pki.new_authority(settings.name)
            server = authority.issue_server(list(settings.broker_hosts))
            for path, data, mode in (
                (stage.ca_cert, authority.cert_pem, 0o644),
                (stage.ca_key, authority.key_pem, 0o600),
                (stage.server_cert, server.cert_pem, 0o644),
                (stage.server_key, server.key_pem, 0o600),
            ):
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_file(path, data, mode)
            stage.signing_key.parent.mkdir(parents=True)
            generate_keypair(stage.signing_key, stage.signing_pub)
            _write_file(stage.settings, settings.to_toml().encode(), 0o600)
            stage.enroll_dir.mkdir(mode=0o700)
            stage.bundles_dir.mkdir()
            _write_file(stage.broker_conf, _broker_conf(final, settings).encode(), 0o644,
                        parents=True)
            fleet = cls(stage, settings, db)
            with db.transaction(create=True) as tx:
                if tx.table_exists("fleet"):
                    existing = tx.scalar("SELECT name FROM fleet WHERE id = 1")
                    raise FailedPrecondition(
                        f"database {db.display_url} already holds fleet {existing!r}")
                db.migrate(tx, MIGRATIONS)
                at = now_ms()
                tx.execute("INSERT INTO fleet (id, name, created_ms, auth_generation) "
                           "VALUES (1, ?, ?, 0)", (settings.name, at))
                enrollment = fleet._enroll(tx, ADMIN_NAME, "admin", authority=authority,
                                           at=at)
                _write_file(stage.enrollment(ADMIN_NAME), enrollment.to_toml().encode(),
                            0o600)
                _event(tx, "init", settings.name, f"broker hosts {', '.join(broker_hosts)}")
                staged_auth = fleet._stage_auth(tx)
                staged_auth.install()  # inside staging: moves with it
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            if not root.exists():
                os.rename(staging, root)
            else:
                for entry in sorted(staging.iterdir()):
                    os.rename(entry, root / entry.name)
                staging.rmdir()
        except OSError as exc:
            raise Unavailable(f"the fleet registry is created but {root} could not be filled "
                              f"({exc}); remove it and the registry, then run init again") \
                from exc
        fleet = cls(final, settings, cls._database(final, db_url))
        result = ChangeResult(
            f"fleet {settings.name!r} created in {root}",
            files=[final.broker_conf, final.ca_cert, final.signing_pub,
                   final.enrollment(ADMIN_NAME)],
            data={"registry": fleet.db.display_url})
        return fleet, result

    # -- enrolling -----------------------------------------------------------------------------

    def _enroll(self, tx: Transaction, name: str, kind: str, *, profile: str = "",
                group: str = "", authority: _pki.Authority | None = None,
                at: int | None = None) -> Enrollment:
        """Write ``name``'s fresh credentials into the registry (insert, or re-enroll a
        removed one) and return its enrollment (not written anywhere yet)."""
        at = at or now_ms()
        authority = authority or self._authority()
        password = _auth.new_password()
        issued = authority.issue_client(name)
        existing = tx.one("SELECT state, kind FROM clients WHERE name = ?", (name,))
        values = (kind, profile or None, group or None, _auth.hash_password(password),
                  issued.serial, "active", at)
        if existing is None:
            tx.execute("INSERT INTO clients (kind, profile, group_name, password_hash, "
                       "cert_serial, state, updated_ms, name, created_ms) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (*values, name, at))
        else:
            tx.execute("UPDATE clients SET kind = ?, profile = ?, group_name = ?, "
                       "password_hash = ?, cert_serial = ?, state = ?, updated_ms = ? "
                       "WHERE name = ?", (*values, name))
        tx.execute("INSERT INTO certificates (serial, client_name, issued_ms, not_after_ms) "
                   "VALUES (?, ?, ?, ?)", (issued.serial, name, at, issued.not_after_ms))
        return Enrollment(
            kind=kind, id=name, fleet=self.settings.name,
            urls=self.settings.certificate_urls, password_urls=self.settings.password_urls,
            username=name, password=password, ca_pem=self.layout.ca_cert.read_text(),
            cert_pem=issued.cert_pem.decode(), key_pem=issued.key_pem.decode(),
            bundle_public_key_pem=self.layout.signing_pub.read_text(),
            profile=profile, group=group, issued_at=_iso(at))

    def _new_client(self, tx: Transaction, change: _Change, name: str, kind: str, *,
                    profile: str = "", group: str = "") -> Path:
        existing = tx.one("SELECT state, kind FROM clients WHERE name = ?", (name,))
        if existing is not None and existing["state"] == "active":
            raise FailedPrecondition(
                f"{name!r} is already enrolled (as a {existing['kind']}); "
                f"use 'tandem fleet rotate {name}' for new credentials")
        enrollment = self._enroll(tx, name, kind, profile=profile, group=group)
        path = self.layout.enrollment(name)
        change.add(stage_file(path, enrollment.to_toml().encode(), 0o600))
        return path

    def add_device(self, device_id: str, *, profile: str, group: str | None = None
                   ) -> ChangeResult:
        """Register a device and stage its enrollment file."""
        from tandem.devices.profiles import get_profile

        check_name(device_id, "device id")
        get_profile(profile)  # NotFound naming close matches
        if group is not None:
            check_name(group, "group name")

        def work(tx: Transaction, change: _Change) -> ChangeResult:
            if group is not None and tx.one(
                    "SELECT name FROM fleet_groups WHERE name = ?", (group,)) is None:
                raise NotFound(f"no group {group!r} (create it: tandem fleet group add {group})")
            path = self._new_client(tx, change, device_id, "device", profile=profile,
                                    group=group or "")
            _event(tx, "add", device_id, f"profile {profile}" + (f", group {group}"
                                                                 if group else ""))
            return ChangeResult(f"device {device_id!r} enrolled", files=[path])

        return self._change(work, auth=True)

    def add_worker(self, name: str) -> ChangeResult:
        """Register a cloud worker and stage its enrollment file."""
        check_name(name, "worker name")

        def work(tx: Transaction, change: _Change) -> ChangeResult:
            path = self._new_client(tx, change, name, "worker")
            _event(tx, "add-worker", name)
            return ChangeResult(f"worker {name!r} enrolled", files=[path])

        return self._change(work, auth=True)

    def _active(self, tx: Transaction, name: str) -> dict[str, Any]:
        check_name(name, "name")
        row = tx.one("SELECT * FROM clients WHERE name = ?", (name,))
        if row is None or row["state"] != "active":
            raise NotFound(f"no enrolled device or worker {name!r}")
        return row

    def _revoke_certificate(self, tx: Transaction, serial: str | None, reason: str,
                            at: int) -> None:
        if serial:
            tx.execute("UPDATE certificates SET revoked_ms = ?, revoke_reason = ? "
                       "WHERE serial = ? AND revoked_ms IS NULL", (at, reason, serial))

    def remove(self, name: str) -> ChangeResult:
        """Revoke a device or worker: out of the auth files, its certificate on the CRL."""

        def work(tx: Transaction, change: _Change) -> ChangeResult:
            row = self._active(tx, name)
            if row["kind"] == "admin":
                raise FailedPrecondition(f"{name!r} is the fleet's admin client: it cannot be "
                                         "removed (rotate it instead)")
            at = now_ms()
            tx.execute("UPDATE clients SET state = 'removed', updated_ms = ? WHERE name = ?",
                       (at, name))
            self._revoke_certificate(tx, row["cert_serial"], "removed", at)
            tx.execute("DELETE FROM assignments WHERE device = ?", (name,))
            _event(tx, "remove", name)
            change.add(StagedRemoval(self.layout.enrollment(name)))
            return ChangeResult(f"{row['kind']} {name!r} removed (certificate revoked)",
                                data={"kind": row["kind"]})

        return self._change(work, auth=True)

    def rotate(self, name: str) -> ChangeResult:
        """New password and certificate for ``name``; the old ones stop working on reload."""

        def work(tx: Transaction, change: _Change) -> ChangeResult:
            row = self._active(tx, name)
            at = now_ms()
            self._revoke_certificate(tx, row["cert_serial"], "superseded", at)
            enrollment = self._enroll(tx, name, row["kind"], profile=row["profile"] or "",
                                      group=row["group_name"] or "", at=at)
            path = self.layout.enrollment(name)
            change.add(stage_file(path, enrollment.to_toml().encode(), 0o600))
            _event(tx, "rotate", name)
            return ChangeResult(f"{row['kind']} {name!r}: new credentials", files=[path])

        return self._change(work, auth=True)

    def sync(self) -> ChangeResult:
        """Rewrite the auth files (and the CRL's validity) from the registry."""

        def work(tx: Transaction, change: _Change) -> ChangeResult:
            _event(tx, "sync", self.settings.name)
            return ChangeResult("auth files rewritten from the registry")

        return self._change(work, auth=True)

    # -- groups --------------------------------------------------------------------------------

    def add_group(self, name: str) -> ChangeResult:
        check_name(name, "group name")

        def work(tx: Transaction, change: _Change) -> ChangeResult:
            if tx.one("SELECT name FROM fleet_groups WHERE name = ?", (name,)):
                raise FailedPrecondition(f"group {name!r} exists already")
            tx.execute("INSERT INTO fleet_groups (name, created_ms) VALUES (?, ?)",
                       (name, now_ms()))
            _event(tx, "group-add", name)
            return ChangeResult(f"group {name!r} created")

        return self._change(work, auth=False)

    def remove_group(self, name: str) -> ChangeResult:
        check_name(name, "group name")

        def work(tx: Transaction, change: _Change) -> ChangeResult:
            if not tx.one("SELECT name FROM fleet_groups WHERE name = ?", (name,)):
                raise NotFound(f"no group {name!r}")
            members = tx.all("SELECT name FROM clients WHERE group_name = ? AND "
                             "state = 'active' ORDER BY name", (name,))
            if members:
                raise FailedPrecondition(
                    f"group {name!r} still has {len(members)} device(s): "
                    + ", ".join(m["name"] for m in members[:5]))
            tx.execute("UPDATE clients SET group_name = NULL WHERE group_name = ?", (name,))
            tx.execute("DELETE FROM fleet_groups WHERE name = ?", (name,))
            _event(tx, "group-remove", name)
            return ChangeResult(f"group {name!r} removed")

        return self._change(work, auth=False)

    def groups(self) -> list[dict[str, Any]]:
        return self._read(lambda tx: tx.all(
            "SELECT g.name, g.created_ms, "
            "(SELECT COUNT(*) FROM clients c WHERE c.group_name = g.name AND "
            "c.state = 'active') AS devices FROM fleet_groups g ORDER BY g.name"))

    # -- reading -------------------------------------------------------------------------------

    def clients(self, *, include_removed: bool = False, kind: str | None = None
                ) -> list[dict[str, Any]]:
        """Every client with its current certificate and assignment, sorted by name."""

        def read(tx: Transaction) -> list[dict[str, Any]]:
            where, params = [], []
            if not include_removed:
                where.append("c.state = 'active'")
            if kind:
                where.append("c.kind = ?")
                params.append(kind)
            sql = ("SELECT c.name, c.kind, c.profile, c.group_name, c.state, c.cert_serial, "
                   "c.created_ms, c.updated_ms, cert.not_after_ms, a.bundle_digest, "
                   "a.issued_ms AS assigned_ms, b.model_name, b.model_version "
                   "FROM clients c "
                   "LEFT JOIN certificates cert ON cert.serial = c.cert_serial "
                   "LEFT JOIN assignments a ON a.device = c.name "
                   "LEFT JOIN bundles b ON b.digest = a.bundle_digest")
            if where:
                sql += " WHERE " + " AND ".join(where)
            return tx.all(sql + " ORDER BY c.name", params)

        return self._read(read)

    def show(self, name: str) -> dict[str, Any]:
        check_name(name, "name")

        def read(tx: Transaction) -> dict[str, Any]:
            row = tx.one("SELECT name, kind, profile, group_name, state, cert_serial, "
                         "created_ms, updated_ms FROM clients WHERE name = ?", (name,))
            if row is None:
                raise NotFound(f"no device or worker {name!r}")
            row["certificates"] = tx.all(
                "SELECT serial, issued_ms, not_after_ms, revoked_ms, revoke_reason "
                "FROM certificates WHERE client_name = ? ORDER BY issued_ms DESC", (name,))
            assignment = tx.one(
                "SELECT a.bundle_digest, a.uris, a.issued_ms, b.model_name, b.model_version, "
                "b.archive_sha256, b.archive_size FROM assignments a "
                "JOIN bundles b ON b.digest = a.bundle_digest WHERE a.device = ?", (name,))
            if assignment is not None:
                assignment["uris"] = json.loads(assignment["uris"])
            row["assignment"] = assignment
            row["events"] = tx.all(
                "SELECT at_ms, action, detail FROM events WHERE subject = ? "
                "ORDER BY id DESC LIMIT 20", (name,))
            row["acl"] = [f"{access} {topic}" for access, topic in
                          _auth.acl_rules(name, row["kind"])] if row["state"] == "active" \
                else []
            row["enrollment_file"] = str(self.layout.enrollment(name)) \
                if self.layout.enrollment(name).exists() else ""
            return row

        return self._read(read)

    def admin_enrollment(self) -> Enrollment:
        from tandem.devices.fleet._enroll import load_enrollment

        path = self.layout.enrollment(ADMIN_NAME)
        if not path.exists():
            raise NotFound(f"the admin enrollment {path} is missing: run "
                           f"'tandem fleet rotate {ADMIN_NAME}'")
        return load_enrollment(path)

    # -- assignments ---------------------------------------------------------------------------

    def record_assignment(self, targets_of: Callable[[Transaction], list[str]],
                          bundle_row: dict[str, Any], uris: Sequence[str],
                          staged_archive: StagedFile | None) -> tuple[list[str], int]:
        """Record ``bundle_row`` and the assignment of it to the devices ``targets_of`` finds,
        in one transaction; the staged archive is installed after the commit."""

        def work(tx: Transaction, change: _Change) -> tuple[list[str], int]:
            targets = targets_of(tx)
            at = now_ms()
            if tx.one("SELECT digest FROM bundles WHERE digest = ?",
                      (bundle_row["digest"],)) is None:
                tx.execute("INSERT INTO bundles (digest, model_name, model_version, "
                           "archive_name, archive_sha256, archive_size, signature, added_ms) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (bundle_row["digest"], bundle_row["model_name"],
                            bundle_row["model_version"], bundle_row["archive_name"],
                            bundle_row["archive_sha256"], bundle_row["archive_size"],
                            bundle_row["signature"], at))
            elif staged_archive is not None:
                tx.execute("UPDATE bundles SET archive_name = ?, archive_sha256 = ?, "
                           "archive_size = ?, signature = ? WHERE digest = ?",
                           (bundle_row["archive_name"], bundle_row["archive_sha256"],
                            bundle_row["archive_size"], bundle_row["signature"],
                            bundle_row["digest"]))
            for device in targets:
                tx.execute("DELETE FROM assignments WHERE device = ?", (device,))
                tx.execute("INSERT INTO assignments (device, bundle_digest, uris, issued_ms) "
                           "VALUES (?, ?, ?, ?)",
                           (device, bundle_row["digest"], json.dumps(list(uris)), at))
                _event(tx, "assign", device,
                       f"{bundle_row['model_name']} {bundle_row['model_version']} "
                       f"{bundle_row['digest'][:12]}")
            if staged_archive is not None:
                change.add(staged_archive)
            return targets, at

        return self._change(work, auth=False)

    def resolve_targets(self, tx: Transaction, devices: Sequence[str],
                        group: str | None) -> list[str]:
        """The active devices named, or in ``group``; unknown ones raise NotFound."""
        targets: list[str] = []
        for device in devices:
            row = tx.one("SELECT kind, state FROM clients WHERE name = ?",
                         (check_name(device, "device id"),))
            if row is None or row["state"] != "active" or row["kind"] != "device":
                raise NotFound(f"no enrolled device {device!r}")
            targets.append(device)
        if group is not None:
            check_name(group, "group name")
            if tx.one("SELECT name FROM fleet_groups WHERE name = ?", (group,)) is None:
                raise NotFound(f"no group {group!r}")
            members = [r["name"] for r in tx.all(
                "SELECT name FROM clients WHERE group_name = ? AND state = 'active' AND "
                "kind = 'device' ORDER BY name", (group,))]
            if not members:
                raise FailedPrecondition(f"group {group!r} has no devices")
            targets += [m for m in members if m not in targets]
        if not targets:
            raise InvalidArgument("name a device or a --group to assign to")
        return targets

    def current_assignments(self) -> list[dict[str, Any]]:
        """Every recorded assignment with its bundle (for republishing)."""

        def read(tx: Transaction) -> list[dict[str, Any]]:
            rows = tx.all(
                "SELECT a.device, a.uris, a.issued_ms, b.digest, b.model_name, "
                "b.model_version, b.archive_sha256, b.archive_size, b.signature "
                "FROM assignments a JOIN bundles b ON b.digest = a.bundle_digest "
                "JOIN clients c ON c.name = a.device WHERE c.state = 'active' "
                "ORDER BY a.device")
            for r in rows:
                r["uris"] = json.loads(r["uris"])
            return rows

        return self._read(read)

    def assigned_digests(self) -> dict[str, str]:
        return {r["device"]: r["digest"] for r in self.current_assignments()}

    def crl_expiry_warning(self, within_days: int = 30) -> str:
        """A warning when the installed CRL expires within ``within_days`` ("" otherwise):
        an expired CRL makes mosquitto refuse every client certificate."""
        from cryptography import x509

        try:
            crl = x509.load_pem_x509_crl((self.layout.auth_link / "crl.pem").read_bytes())
        except (OSError, ValueError):
            return "the broker's CRL is missing or unreadable: run 'tandem fleet sync'"
        next_update = crl.next_update_utc
        if next_update is None:
            return ""
        left = next_update - dt.datetime.now(dt.timezone.utc)
        if left > dt.timedelta(days=within_days):
            return ""
        return (f"the broker's CRL expires {next_update:%Y-%m-%d} (then mosquitto refuses every "
                "client certificate): run 'tandem fleet sync' and reload the broker")

    def auth_lagging(self) -> bool:
        """True when the installed auth files are older than the registry."""
        generation = self._read(self._auth_generation)
        return generation != current_generation(self.layout.auth_link)


def assignment_message(row: dict[str, Any]):
    """The protocol :class:`~tandem.protocol.Assignment` for a row of
    :meth:`Fleet.current_assignments`."""
    from tandem.protocol.messages import Assignment

    uris = list(row["uris"])
    return Assignment(
        device_id=row["device"], model_name=row["model_name"], bundle_digest=row["digest"],
        bundle_uri=uris[0] if uris else "", issued_at_ms=int(row["issued_ms"]),
        model_version=row["model_version"], archive_sha256=row["archive_sha256"],
        archive_size=int(row["archive_size"]),
        signature=base64.b64decode(row["signature"]), mirror_uris=tuple(uris[1:]))


def _event(tx: Transaction, action: str, subject: str, detail: str = "") -> None:
    tx.execute("INSERT INTO events (at_ms, action, subject, detail) VALUES (?, ?, ?, ?)",
               (now_ms(), action, subject, detail))


def _write_file(path: Path, data: bytes, mode: int, *, parents: bool = False) -> None:
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    write_new(path, data, mode)


def _auth_files(tx: Transaction, authority: _pki.Authority, fleet_name: str,
                generation: int) -> dict[str, tuple[bytes, int]]:
    rows = tx.all("SELECT name, kind, password_hash FROM clients WHERE state = 'active' "
                  "ORDER BY name")
    entries = [_auth.AclEntry(r["name"], r["kind"], r["password_hash"]) for r in rows]
    revoked = [(r["serial"], int(r["revoked_ms"])) for r in tx.all(
        "SELECT serial, revoked_ms FROM certificates WHERE revoked_ms IS NOT NULL "
        "ORDER BY serial")]
    header = (f"Tandem fleet {fleet_name!r}, auth generation {generation} "
              "(written by tandem fleet: edit the fleet, not this file)")
    return {
        # world-readable on purpose: the broker may run as another user, and hashes of
        # 192-bit random passwords reveal nothing useful
        "passwd": (_auth.render_passwd(entries).encode(), 0o644),
        "acl": (_auth.render_acl(entries, header=header).encode(), 0o644),
        "crl.pem": (authority.crl(revoked), 0o644),
    }


def _broker_conf(layout: Layout, settings: FleetSettings) -> str:
    auth = layout.auth_link
    return _auth.render_broker_conf(
        _auth.BrokerLayout(
            password_file=str(auth / "passwd"), acl_file=str(auth / "acl"),
            crl_file=str(auth / "crl.pem"), ca_file=str(layout.ca_cert),
            cert_file=str(layout.server_cert), key_file=str(layout.server_key),
            bind=settings.bind, tls_port=settings.tls_port,
            password_port=settings.password_port, plain_port=settings.plain_port or None),
        fleet_name=settings.name)

