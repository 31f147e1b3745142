"""The user's guide stays true: the quickstart runs as written (on free ports, in a temporary
directory), every `tandem` command line in docs/ names options its command has, docs/cli.md
describes every command and option there is, and docs/ links only to files that exist."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests._support.broker import free_port, mosquitto_binary

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE = ["quickstart.md", "concepts.md", "cli.md", "jetson.md", "scaling.md", "security.md"]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def _commands() -> dict[tuple[str, ...], click.Command]:
    """Every runnable ``tandem`` command by its path, e.g. ("link", "run")."""
    from tandem.cli import cli

    ctx = click.Context(cli)
    found: dict[tuple[str, ...], click.Command] = {}

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), (*path, name))
        else:
            found[path] = cmd

    walk(cli, ())
    return found


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts,
                                                                          *p.secondary_opts)}


def test_the_guide_exists_and_links_only_to_files_that_exist():
    for name in GUIDE:
        text = (DOCS / name).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            assert not re.match(r"[a-z]+://", target), f"{name} links outside: {target}"
            if target.endswith("edge.md") and not (DOCS / "edge.md").exists():
                continue  # the edge engineer's page, linked ahead of its merge
            assert (DOCS / target).resolve().exists(), f"{name} links to missing {target}"


def test_every_tandem_command_line_in_the_guide_uses_options_its_command_has():
    commands = _commands()
    checked = 0
    for name in GUIDE:
        text = (DOCS / name).read_text()
        lines = []
        for block in _blocks(text, "bash") + _blocks(text, "ini"):
            lines += block.replace("\\\n", " ").splitlines()
        lines += re.findall(r"`(tandem [^`]+)`", text)
        for line in lines:
            for part in re.split(r"&&|\||;|\$\(", line):
                words = part.strip().split()
                while words and words[0] != "tandem" and not words[0].endswith("/tandem"):
                    words = words[1:]
                if not words:
                    continue
                words = words[1:]
                path: tuple[str, ...] = ()
                while (words and (*path, words[0]) in commands) or any(
                        k[: len(path) + 1] == (*path, words[0]) for k in commands if words):
                    path = (*path, words.pop(0))
                    if path in commands:
                        break
                if path not in commands:
                    continue  # `tandem --help`, or prose such as `tandem edge run` ahead of it
                known = _options(commands[path]) | {"--help", "-h"}
                for word in words:
                    option = word.split("=", 1)[0]
                    if option.startswith("--") and re.fullmatch(r"--[a-z0-9-]+", option):
                        assert option in known, f"{name}: `tandem {' '.join(path)}` has no " \
                                                f"{option} ({line.strip()})"
                checked += 1
    assert checked >= 15


def test_the_cli_reference_describes_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    sections = dict(re.findall(r"^### `tandem ([^`]+)`\n(.*?)(?=^### |\Z)", text,
                               re.MULTILINE | re.DOTALL))
    for path, cmd in _commands().items():
        key = " ".join(path)
        assert key in sections, f"docs/cli.md has no section ### `tandem {key}`"
        for option in _options(cmd) - {"--help", "-h"}:
            if option.startswith("--"):
                assert f"`{option}" in sections[key], f"docs/cli.md: tandem {key} {option}"


@pytest.mark.skipif(mosquitto_binary() is None, reason="the quickstart needs mosquitto")
@pytest.mark.skipif(shutil.which("curl") is None, reason="the quickstart uses curl")
def test_the_quickstart_runs_as_written(tmp_path, tmp_path_factory):
    pytest.importorskip("aiohttp", reason="the cloud extra is not installed")
    text = (DOCS / "quickstart.md").read_text()
    shell = _blocks(text, "bash")
    python = _blocks(text, "python")
    assert len(shell) == 5 and len(python) == 1
    ports = {"1883": free_port(), "2883": free_port(), "2884": free_port(), "8080": free_port()}

    def localize(code: str) -> str:
        for old, new in ports.items():
            code = re.sub(rf"\b{old}\b", str(new), code)
        return code

    setup, *steps, cleanup = shell
    assert "pip install -e '.[dev]'" in setup
    script = "\n".join(localize(s) for s in steps)
    script += "\npython - <<'PY'\n" + localize(python[0]) + "PY\n"
    script += "\n".join(line for line in cleanup.splitlines() if "pytest" not in line)
    mosquitto_dir = str(Path(mosquitto_binary()).parent)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{mosquitto_dir}"
                                f"{os.pathsep}{os.environ['PATH']}")
    env.pop("TANDEM_DEBUG", None)
    logs = tmp_path_factory.mktemp("quickstart-logs")
    with open(logs / "out", "w") as out_f, open(logs / "err", "w") as err_f:
        # files, not pipes: a background job of a failed script must not hold the test open
        proc = subprocess.Popen(["bash", "-euc", script + "\nwait\n"], cwd=tmp_path, env=env,
                                stdout=out_f, stderr=err_f, start_new_session=True)
        try:
            proc.wait(timeout=240)
        finally:  # whatever a failed step left running (the broker, the worker, the link)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out, err = (logs / "out").read_text(), (logs / "err").read_text()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    times = [float(m) for m in re.findall(r"^(\d+\.\d) ms \d+$", out, re.MULTILINE)]
    assert len(times) == 5
    assert min(times) >= 50  # two one-way delays of the LTE link, at least
    assert not list(tmp_path.glob("**/*.pid"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
