"""Just enough TOML writing for the fleet's own files, and reading through ``tomllib``.

The fleet writes flat documents: top-level scalars, then tables of strings, integers, booleans
and lists of strings. Hand-written (about 40 lines) instead of a dependency; every document is
parsed back with ``tomllib`` before it is returned, so a writer bug can never produce a file the
readers would refuse.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tandem.protocol.errors import InternalError, InvalidArgument

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["dumps", "loads", "read"]

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _string(s: str, *, multiline: bool = True) -> str:
    # a PEM reads best as a literal multi-line string; anything else as a basic string
    if multiline and "\n" in s and "'''" not in s and \
            all(c == "\n" or " " <= c < "\x7f" for c in s):
        return "'''\n" + s + "'''"
    out = []
    for c in s:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise InternalError(f"cannot write {type(v).__name__} as TOML")


def _key(k: str) -> str:
    if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k):
        return k
    return _string(k, multiline=False)


def dumps(doc: Mapping[str, Any], *, header: str = "") -> str:
    """TOML text for ``doc`` (top-level scalars first, then one table per mapping value)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    tables = {k: v for k, v in doc.items() if isinstance(v, Mapping)}
    for k, v in doc.items():
        if k not in tables and v is not None:
            lines.append(f"{_key(k)} = {_value(v)}")
    for name, table in tables.items():
        lines += ["", f"[{_key(name)}]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in table.items() if v is not None]
    text = "\n".join(lines) + "\n"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # our bug, never the user's
        raise InternalError(f"wrote TOML that does not parse: {exc}") from exc
    return text


def loads(text: str, *, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{what}: not valid TOML ({exc})") from None


_MAX_FILE_BYTES = 1 << 20


def read(path: Path, *, what: str) -> dict[str, Any]:
    """Parse a TOML file of at most 1 MiB; errors name ``what`` and the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InvalidArgument(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_FILE_BYTES:
        raise InvalidArgument(f"{what} {path} is over {_MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} {path} is not UTF-8 text") from None
    return loads(text, what=f"{what} {path}")
