"""Fleet provisioning: the registry of devices and cloud workers, their credentials (mosquitto
password hashes, client certificates from the fleet's CA), the broker's auth files, bundle
assignments, and what a device needs to join (its enrollment file) and to fetch an assigned
bundle (:func:`fetch_bundle`).

The ``tandem fleet`` command (``tandem.devices.fleet.cli``) drives :class:`Fleet`; the edge
daemon and the cloud endpoint read enrollment files with :func:`load_enrollment`. aiohttp (the
dashboard), psycopg (PostgreSQL registries) and zeroconf (discovery) load on use: the ``fleet``
and ``discovery`` extras.
"""

from tandem.devices.fleet._auth import hash_password, verify_password
from tandem.devices.fleet._enroll import (
    ENROLLMENT_FORMAT,
    Enrollment,
    load_enrollment,
    parse_broker_url,
)
from tandem.devices.fleet._fetch import fetch_bundle
from tandem.devices.fleet._fleet import ADMIN_NAME, ChangeResult, Fleet
from tandem.devices.fleet._ids import check_name

__all__ = [
    "ADMIN_NAME",
    "ENROLLMENT_FORMAT",
    "ChangeResult",
    "Enrollment",
    "Fleet",
    "check_name",
    "fetch_bundle",
    "hash_password",
    "load_enrollment",
    "parse_broker_url",
    "verify_password",
]
