"""The settings layer shared by the service commands: parsers from annotations, precedence,
paths relative to the file, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tandem.protocol.errors import InvalidArgument
from tandem.protocol.settings import field_parsers, merge_settings, optional, to_int


@dataclass
class _S:
    name: str = "x"
    port: int = 1
    ratio: float = 0.5
    on: bool = False
    where: Path | None = None
    limit: int | None = None


def test_parsers_come_from_the_annotations():
    p = field_parsers(_S)
    assert p["port"]("12") == 12 and p["ratio"]("1.5") == 1.5 and p["on"]("yes") is True
    assert p["where"]("off") is None and p["limit"]("") is None and p["limit"]("3") == 3
    for parser, bad in ((p["port"], "1.5"), (p["port"], True), (p["ratio"], "nan"),
                        (p["on"], "maybe"), (p["name"], 3)):
        with pytest.raises(ValueError):
            parser(bad)

    @dataclass
    class Odd:
        items: list = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match="no parser"):
        field_parsers(Odd)
    assert field_parsers(Odd, {"items": optional(to_int)})["items"]("4") == 4


def test_layers_and_relative_paths(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[svc]\nport = 5\nwhere = "data"\nname = "file"\n')
    p = field_parsers(_S)
    got = merge_settings(p, {"name": "opt", "ratio": None}, table="svc",
                         env={"TANDEM_PORT": "6"}, config_file=f,
                         below=[("enrollment", {"name": "low", "on": True})],
                         file_relative=("where",))
    assert got == {"name": "opt", "port": 6, "where": tmp_path / "data", "on": True}
    got = merge_settings(p, {"where": "rel"}, table="svc", env={}, config_file=f,
                         file_relative=("where",))
    assert got["where"] == Path("rel")  # not from the file: as given
    with pytest.raises(InvalidArgument, match="TANDEM_PORT: expected an integer, got 'x'"):
        merge_settings(p, {}, table="svc", env={"TANDEM_PORT": "x"})
    with pytest.raises(InvalidArgument, match=r"unknown option\(s\) \['nope'\]"):
        merge_settings(p, {"nope": 1}, table="svc", env={})
    with pytest.raises(InvalidArgument, match="enrollment: unknown setting 'nope'"):
        merge_settings(p, {}, table="svc", env={}, below=[("enrollment", {"nope": 1})])
    with pytest.raises(InvalidArgument, match=r"got 'xxxx.*\.\.\.$"):
        merge_settings(p, {"port": "x" * 500}, table="svc", env={})
