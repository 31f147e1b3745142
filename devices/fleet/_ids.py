"""Names in a fleet: device ids, worker names, group names.

A name becomes a topic level, an MQTT username and client id, a certificate CN, a line of
mosquitto's password and ACL files and a file name, so it must be safe in all of them: first
topic-safe (:func:`tandem.protocol.topics.validate_id`, for its precise message), then letters,
digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 64 characters (no
``:`` that would split a password-file line, no space that mosquitto's ACL parser trims).
"""

from __future__ import annotations

import re

from tandem.protocol.errors import InvalidArgument
from tandem.protocol.topics import validate_id

__all__ = ["MAX_NAME_LEN", "check_name"]

MAX_NAME_LEN = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: object, what: str) -> str:
    """``name`` if it is usable as a ``what`` (e.g. "device id"); InvalidArgument if not."""
    if not isinstance(name, str):
        raise InvalidArgument(f"{what} must be a string")
    validate_id(name, what)
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{what} {name!r} is not usable: use letters, digits, '.', '_' and '-', starting "
            f"with a letter or digit, at most {MAX_NAME_LEN} characters")
    return name
