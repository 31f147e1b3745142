"""`tandem fleet` as a stranger uses it: every --help, bad arguments and bad input as one line
`error: …` with a non-zero exit and nothing changed, output piped into head, 80 columns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.cli import main
from tests.devices.fleet.conftest import init_fleet
from tests.devices.fleet.test_registry import snapshot

SUBCOMMANDS = ["init", "add", "add-worker", "list", "show", "remove", "rotate", "assign",
               "status", "dashboard", "discover", "sync", "check", "group"]


@pytest.fixture
def db_url():
    """The command line does not depend on the database (test_registry.py runs the registry on
    both): SQLite only here."""
    return None


def env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                 f"{os.environ['PATH']}")


def fleet_args(fleet, *args: str) -> list[str]:
    return ["fleet", *args, "--fleet-dir", str(fleet.layout.root), "--db", fleet.db.url]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub, capsys):
    assert main(["fleet", sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: tandem fleet")
    if sub not in ("group", "check"):
        assert "--fleet-dir" in out and "--db" in out


def one_error_line(capsys) -> str:
    return one_error_line_of(capsys.readouterr().err)


@pytest.mark.parametrize("args,message", [
    (["add", "cam/01", "--profile", "cpu-x86_64"], "must not contain"),
    (["add", "cam+01", "--profile", "cpu-x86_64"], "must not contain"),
    (["add", "$SYS", "--profile", "cpu-x86_64"], "must not start with '$'"),
    (["add", "cam 01", "--profile", "cpu-x86_64"], "is not usable"),
    (["add", "cam-02", "--profile", "nope"], "no device profile 'nope'"),
    (["add", "cam-02", "--profile", "cpu-x86_64", "--group", "nope"], "no group 'nope'"),
    (["add", "cam-01", "--profile", "cpu-x86_64"], "already enrolled"),
    (["add-worker", "cam-01"], "already enrolled"),
    (["remove", "cam-99"], "no enrolled device or worker 'cam-99'"),
    (["rotate", "nobody"], "no enrolled device or worker"),
    (["show", "nobody"], "no device or worker 'nobody'"),
    (["group", "remove", "nope"], "no group 'nope'"),
    (["assign", "cam-01", "/no/such/bundle"], "no bundle"),
    (["assign", "bundle-only"], "name a DEVICE or a --group"),
])
def test_bad_input_is_one_line_and_changes_nothing(fleet, capsys, args, message):
    main(fleet_args(fleet, "add", "cam-01", "--profile", "cpu-x86_64"))
    capsys.readouterr()
    before = snapshot(fleet)
    assert main(fleet_args(fleet, *args)) == 1
    line = one_error_line(capsys)
    assert line.startswith("error: ") and message in line, line
    assert snapshot(fleet) == before


def test_usage_errors_exit_2(fleet, capsys):
    assert main(fleet_args(fleet, "add", "cam-01")) == 2  # --profile is required
    assert "Missing option '--profile'" in capsys.readouterr().err
    assert main(["fleet", "init", "--tls-port", "many"]) == 2
    assert main(fleet_args(fleet, "dashboard", "--port", "99999")) == 2
    assert main(fleet_args(fleet, "discover", "--timeout", "-1")) == 2
    assert main(["fleet", "check", "x.toml", "--wait", "-5"]) == 2


def test_a_missing_fleet_and_an_unreachable_database(tmp_path, capsys, fleet):
    assert main(["fleet", "list", "--fleet-dir", str(tmp_path / "none")]) == 1
    assert "not a fleet directory" in one_error_line(capsys)
    assert main(["fleet", "list", "--fleet-dir", str(fleet.layout.root), "--db",
                 "postgresql://op:hunter2@127.0.0.1:1/fleet"]) == 1
    line = one_error_line(capsys)
    assert "unreachable" in line and "hunter2" not in line


def test_init_via_the_cli_and_its_errors(tmp_path, capsys):
    root = tmp_path / "fleet"
    assert main(["fleet", "init", "--fleet-dir", str(root), "--broker-host", "broker.local",
                 "--tls-port", "18883", "--password-port", "18884"]) == 0
    out = capsys.readouterr().out
    assert "fleet 'fleet' created" in out and "tandem-admin.toml" in out
    assert main(["fleet", "init", "--fleet-dir", str(root)]) == 1
    assert "already a fleet directory" in one_error_line(capsys)
    for bad in (["--tls-port", "0"], ["--tls-port", "8884"], ["--broker-host", "a b"],
                ["--bundle-base-url", "ftp://x"], ["--name", "a/b"]):
        assert main(["fleet", "init", "--fleet-dir", str(tmp_path / "f2"), *bad]) == 1, bad
        assert one_error_line(capsys).startswith("error: ")
        assert not (tmp_path / "f2").exists()


def test_a_failed_reload_is_the_commands_error_after_the_change(fleet, capsys):
    # the fleet names a pid file, but no broker wrote it
    assert main(fleet_args(fleet, "add", "cam-01", "--profile", "cpu-x86_64")) == 1
    captured = capsys.readouterr()
    assert "device 'cam-01' enrolled" in captured.out
    line = one_error_line_of(captured.err)
    assert "cannot reload the broker" in line and "registry and the auth files are updated" \
        in line
    assert "cam-01" in (fleet.layout.auth_link / "passwd").read_text()


def one_error_line_of(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_list_show_and_groups(tmp_path, db_url, capsys, monkeypatch):
    fleet, _ = init_fleet(tmp_path / "fleet", db_url, pid_file="")
    monkeypatch.setenv("COLUMNS", "80")
    assert main(fleet_args(fleet, "group", "add", "lobby")) == 0
    assert main(fleet_args(fleet, "add", "cam-01", "--profile", "jetson-orin-nano-8gb",
                           "--group", "lobby")) == 0
    assert main(fleet_args(fleet, "add-worker", "gpu-1")) == 0
    out = capsys.readouterr()
    assert "enrollment file:" in out.out
    assert "reload" in out.err  # no broker pid yet: the operator is told to reload
    assert main(fleet_args(fleet, "list")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "KIND"]
    assert all(len(line) <= 80 for line in lines)
    assert [line.split()[0] for line in lines[1:]] == ["cam-01", "gpu-1", "tandem-admin"]
    assert main(fleet_args(fleet, "show", "cam-01")) == 0
    shown = capsys.readouterr().out
    assert "device cam-01 (active)" in shown and "write tandem/v1/req/cam-01/+" in shown
    assert main(fleet_args(fleet, "group", "list")) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["lobby", "1"]


def test_output_on_a_terminal_into_head_and_into_a_closed_pipe(fleet):
    from tests._support.terminal import into_head, on_terminal, stdout_closed

    fleet.add_group("a-group-with-a-long-name")
    for i in range(3):
        fleet.add_device(f"cam-{i}", profile="jetson-orin-nano-8gb",
                         group="a-group-with-a-long-name")
    args = fleet_args(fleet, "list")
    rc, shown, err = on_terminal(args, columns=60)
    assert rc == 0, err
    assert all(len(line) <= 60 for line in shown.splitlines()), shown
    assert "cam-2" in shown and "tandem-admin" in shown
    rc, first, err = into_head(args)
    assert rc == 0 and first.split() == ["NAME", "KIND", "PROFILE", "GROUP", "BUNDLE", "CERT",
                                         "UNTIL"]
    assert err == ""
    rc, err = stdout_closed([*fleet_args(fleet, "list", "--json")])
    assert rc == 0 and "Traceback" not in err and "Broken" not in err, err


def test_sqlite_fleets_work_without_the_fleet_extra(tmp_path):
    """psycopg, aiohttp and zeroconf blocked, as on a core install: SQLite fleet commands work,
    a PostgreSQL URL and the dashboard name the extra to install."""
    from tests.test_packaging import BLOCKER

    code = BLOCKER + f"""
import sys
from tandem.cli import main
root = {str(tmp_path / "fleet")!r}
assert main(["fleet", "init", "--fleet-dir", root]) == 0
assert main(["fleet", "add", "cam-01", "--profile", "cpu-x86_64", "--fleet-dir", root]) == 0
assert main(["fleet", "list", "--fleet-dir", root]) == 0
assert main(["fleet", "list", "--fleet-dir", root, "--db", "postgresql://x@127.0.0.1/y"]) == 1
assert main(["fleet", "dashboard", "--fleet-dir", root, "--port", "1"]) == 1
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("psycopg", "aiohttp", "zeroconf"))
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("[fleet]") == 2, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unsigned_and_tampered_bundles_are_one_line_errors(fleet, compiled_bundle, tmp_path,
                                                           capsys):
    import shutil

    main(fleet_args(fleet, "add", "cam-01", "--profile", "cpu-x86_64"))
    capsys.readouterr()
    bundle = tmp_path / "bundle"
    shutil.copytree(compiled_bundle, bundle)
    before = snapshot(fleet)
    assert main(fleet_args(fleet, "assign", "cam-01", str(bundle), "--url", "http://h/b")) == 1
    assert "is not signed; pass --sign" in one_error_line(capsys)
    part = sorted(bundle.rglob("*.onnx"))[0]
    part.write_bytes(part.read_bytes()[:-1])
    assert main(fleet_args(fleet, "assign", "cam-01", str(bundle), "--sign", "--url",
                           "http://h/b")) == 1
    line = one_error_line(capsys)
    assert line.startswith("error: ") and part.name in line
    assert snapshot(fleet) == before
