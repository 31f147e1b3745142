"""Settings of the commands that run as services (``tandem cloud serve``, ``tandem edge run``):
one layer over command-line options, ``TANDEM_*`` environment variables, one table of a TOML
file, and defaults.

Precedence (highest first): the option; the environment variable ``TANDEM_<NAME>`` (the
setting's name in upper case: ``TANDEM_API_PORT``); the TOML file (``config_file``, else
``TANDEM_CONFIG``; keys in the command's table — ``[edge]``, ``[cloud]`` — or at the top level
of a file without that table); any lower layers the command adds (an enrollment file); the
dataclass defaults. Unknown keys in the file and malformed values anywhere are one-line
:class:`~tandem.protocol.errors.InvalidArgument` errors naming where the value came from::

    parsers = field_parsers(EdgeConfig)     # one parser per field, from its annotation
    values = merge_settings(parsers, options, table="edge", env=os.environ)
    config = EdgeConfig(**values)

Standard library only (``tomllib``; ``tomli`` on Python 3.10).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tandem.protocol.errors import InvalidArgument, NotFound

__all__ = [
    "ENV_PREFIX",
    "Parser",
    "field_parsers",
    "merge_settings",
    "optional",
    "read_table",
    "to_bool",
    "to_float",
    "to_int",
    "to_mqtt_version",
    "to_path",
    "to_str",
]

ENV_PREFIX = "TANDEM_"
Parser = Callable[[Any], Any]


def to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
        return int(v)
    raise ValueError("expected an integer")


def to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return out


def to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def to_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def to_mqtt_version(v: Any) -> str | int:
    """An MQTT version setting: ``auto``, ``5`` or ``311`` (as the transports take it)."""
    from tandem.protocol.transport import parse_protocol

    try:
        return parse_protocol(v)
    except InvalidArgument:
        raise ValueError("expected auto, 5 or 311") from None


def to_path(v: Any) -> Path:
    if isinstance(v, Path):
        return v
    return Path(to_str(v)).expanduser()


def optional(conv: Parser) -> Parser:
    """``conv``, with None, ``""``, ``"none"`` and ``"off"`` meaning "not set" (None)."""

    def parse(v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "off")):
            return None
        return conv(v)

    return parse


_BY_TYPE: dict[str, Parser] = {"int": to_int, "float": to_float, "bool": to_bool, "str": to_str,
                               "Path": to_path}


def field_parsers(cls: type, overrides: Mapping[str, Parser] | None = None) -> dict[str, Parser]:
    """One parser per field of the dataclass ``cls``, from its annotation (``int``, ``float``,
    ``bool``, ``str``, ``Path``, each optionally ``| None``); ``overrides`` by field name."""
    out: dict[str, Parser] = {}
    for f in dataclasses.fields(cls):
        text = str(f.type)
        parts = [p.strip() for p in text.split("|")]
        base = [p for p in parts if p != "None"]
        if len(base) != 1 or base[0] not in _BY_TYPE:
            if overrides and f.name in overrides:
                continue
            raise TypeError(f"{cls.__name__}.{f.name}: no parser for {text!r}")
        conv = _BY_TYPE[base[0]]
        out[f.name] = optional(conv) if "None" in parts else conv
    out.update(overrides or {})
    return out


def read_table(path: Path, table: str, known: Iterable[str]) -> dict[str, Any]:
    """The ``[table]`` of a TOML file (or its top level when it has no such table), with every
    key one of ``known``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"config file {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"config file {path}: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"config file {path}: not valid TOML: {exc}") from None
    section = doc.get(table, doc)
    if not isinstance(section, dict):
        raise InvalidArgument(f"config file {path}: [{table}] must be a table")
    if table in doc:
        others = sorted(k for k in doc if k != table and not isinstance(doc[k], dict))
        if others:
            raise InvalidArgument(f"config file {path}: keys outside [{table}]: {others}")
    known = set(known)
    unknown = sorted(set(section) - known)
    if unknown:
        raise InvalidArgument(f"config file {path}: unknown key(s) {unknown} "
                              f"(known: {', '.join(sorted(known))})")
    return dict(section)


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def merge_settings(parsers: Mapping[str, Parser], options: Mapping[str, Any] | None = None, *,
                   table: str, env: Mapping[str, str] | None = None,
                   config_file: Path | str | None = None,
                   below: Iterable[tuple[str, Mapping[str, Any]]] = (),
                   file_relative: Iterable[str] = ()) -> dict[str, Any]:
    """Merge the layers (module docstring) into parsed values by field name.

    ``options``: None values mean "not given"; ``env`` defaults to ``os.environ``; ``below``:
    (label, values) layers under the file, lowest first; ``file_relative``: the path settings
    that, when they come from the file, are relative to the file's directory."""
    env = os.environ if env is None else env
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(parsers))
    if unknown:
        raise InvalidArgument(f"unknown option(s) {unknown}")
    if config_file is None and env.get(f"{ENV_PREFIX}CONFIG"):
        config_file = env[f"{ENV_PREFIX}CONFIG"]
    layers: list[tuple[str, Mapping[str, Any]]] = list(below)
    file_dir: Path | None = None
    if config_file is not None:
        path = Path(config_file).expanduser()
        file_dir = path.parent
        layers.append((f"config file {path}", read_table(path, table, parsers)))
    env_values = {f"{ENV_PREFIX}{name.upper()}": env[f"{ENV_PREFIX}{name.upper()}"]
                  for name in parsers if f"{ENV_PREFIX}{name.upper()}" in env}
    layers.append(("environment", env_values))
    layers.append(("option", options))
    relative = set(file_relative)
    merged: dict[str, Any] = {}
    for where, values in layers:
        from_file = where.startswith("config file")
        for key, raw in values.items():
            name = key[len(ENV_PREFIX):].lower() if where == "environment" else key
            if name not in parsers:
                raise InvalidArgument(f"{where}: unknown setting {name!r}")
            try:
                value = parsers[name](raw)
            except ValueError as exc:
                label = {"environment": key, "option": f"--{name.replace('_', '-')}"}.get(
                    where, f"{where}: {name}")
                raise InvalidArgument(f"{label}: {exc}, got {_shown(raw)}") from None
            if from_file and name in relative and isinstance(value, Path) and \
                    not value.is_absolute() and file_dir is not None:
                value = file_dir / value
            merged[name] = value
    return merged
