"""The systemd unit shipped for the edge daemon (devices/systemd/): systemd accepts it, it is
installed with the package, and what it runs is a command line `tandem edge run` accepts with
a configuration file it accepts."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "devices" / "systemd" / "tandem-edge.service"
CONFIG = ROOT / "devices" / "systemd" / "edge.toml"


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None
        current.setdefault(key, []).append(value)
    return sections


def test_the_unit_runs_the_daemon_as_its_own_user_and_keeps_state():
    unit = _unit()
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0].endswith("/bin/tandem") and argv[1:3] == ["edge", "run"]
    assert service["User"] == ["tandem"] and service["SupplementaryGroups"] == ["video"]
    assert service["StateDirectory"] == ["tandem"]
    assert "XDG_STATE_HOME=/var/lib" in service["Environment"]
    assert service["KillSignal"] == ["SIGTERM"] and service["Restart"] == ["on-failure"]
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"]
    # the GPU stays reachable: no private /dev, no W^X (CUDA maps executable memory)
    assert "PrivateDevices" not in service and "MemoryDenyWriteExecute" not in service
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_accepts_the_unit(tmp_path):
    # verify checks that ExecStart exists: point it at this environment's tandem
    unit = tmp_path / "tandem-edge.service"
    unit.write_text(UNIT.read_text().replace("/opt/tandem/venv/bin/tandem",
                                             str(Path(sys.executable).parent / "tandem")))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    complaints = [line for line in proc.stderr.splitlines() if str(unit) in line]
    assert proc.returncode == 0 and not complaints, proc.stderr


def test_the_unit_and_its_config_ship_with_the_package():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library >= 3.11")
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = conf["package-data"]["tandem.devices"]
    assert "systemd/*" in data
    import tandem.devices

    shipped = Path(tandem.devices.__file__).parent / "systemd"
    assert (shipped / "tandem-edge.service").is_file() and (shipped / "edge.toml").is_file()


def test_the_command_line_and_the_config_are_ones_the_daemon_accepts():
    from importlib.metadata import entry_points

    if "edge" not in {ep.name for ep in entry_points(group="tandem.commands")}:
        pytest.skip("tandem edge is not installed (the edge daemon's branch is not merged)")
    import click

    from tandem.cli import cli

    ctx = click.Context(cli)
    run = cli.get_command(ctx, "edge").get_command(ctx, "run")
    options = {o for p in run.params for o in p.opts}
    argv = shlex.split(_unit()["Service"]["ExecStart"][0])[3:]
    assert all(a in options for a in argv if a.startswith("--"))
    from tandem.edge._config import load_config
    from tandem.protocol.errors import TandemError

    try:
        load_config({}, config_file=CONFIG)
    except TandemError as exc:  # the example's bundle path does not exist here; nothing else
        assert "unknown" not in str(exc).lower(), exc
