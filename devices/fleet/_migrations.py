"""Numbered schema migrations of the fleet registry (SQL common to SQLite and PostgreSQL).

Append a new ``(version, name, statements)`` for every change; never edit one that shipped.
``{auto_id}`` becomes the dialect's auto-increment primary key.
"""

from __future__ import annotations

__all__ = ["LATEST", "MIGRATIONS"]

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "registry", (
        # one row: the fleet itself; auth_generation counts changes of the broker's auth files
        """CREATE TABLE fleet (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            name TEXT NOT NULL,
            created_ms BIGINT NOT NULL,
            auth_generation BIGINT NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE fleet_groups (
            name TEXT PRIMARY KEY,
            created_ms BIGINT NOT NULL
        )""",
        # every MQTT identity: devices, cloud workers and the operator's own admin client
        """CREATE TABLE clients (
            name TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('device', 'worker', 'admin')),
            profile TEXT,
            group_name TEXT REFERENCES fleet_groups (name),
            password_hash TEXT NOT NULL,
            cert_serial TEXT,
            state TEXT NOT NULL CHECK (state IN ('active', 'removed')),
            created_ms BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL
        )""",
        "CREATE INDEX clients_by_group ON clients (group_name)",
        # every client certificate ever issued; revoked ones go on the CRL
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            client_name TEXT NOT NULL,
            issued_ms BIGINT NOT NULL,
            not_after_ms BIGINT NOT NULL,
            revoked_ms BIGINT,
            revoke_reason TEXT
        )""",
        """CREATE TABLE bundles (
            digest TEXT PRIMARY KEY,
            model_name TEXT NOT NULL,
            model_version TEXT NOT NULL,
            archive_name TEXT NOT NULL,
            archive_sha256 TEXT NOT NULL,
            archive_size BIGINT NOT NULL,
            signature TEXT NOT NULL,
            added_ms BIGINT NOT NULL
        )""",
        """CREATE TABLE assignments (
            device TEXT PRIMARY KEY REFERENCES clients (name),
            bundle_digest TEXT NOT NULL REFERENCES bundles (digest),
            uris TEXT NOT NULL,
            issued_ms BIGINT NOT NULL
        )""",
        """CREATE TABLE events (
            id {auto_id},
            at_ms BIGINT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )""",
    )),
)

LATEST = max(version for version, _, _ in MIGRATIONS)
