"""The dispatcher's exit rule (tandem/cli.py): a closed stdout ends a command normally, and
nothing else is mistaken for it."""

from __future__ import annotations

import sys

from tandem.cli import main
from tests._support.terminal import stdout_closed


def _benchmark(tmp_path, monkeypatch, body: str) -> None:
    """A benchmark module ``benchmarks.probe`` in a fresh checkout-like directory."""
    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "benchmarks", raising=False)
    monkeypatch.delitem(sys.modules, "benchmarks.probe", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(tmp_path, monkeypatch, capsys):
    # e.g. a socket whose peer went away: our bug to translate, never a quiet success
    _benchmark(tmp_path, monkeypatch, "def main(argv):\n"
               "    raise BrokenPipeError(32, 'Broken pipe (a socket)')\n")
    assert main(["bench", "probe"]) == 70
    assert "internal error: BrokenPipeError" in capsys.readouterr().err


def test_a_closed_stdout_ends_a_command_quietly(tmp_path):
    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text("def main(argv):\n    for i in range(10000):\n"
                                  "        print('line', i)\n    return 0\n")
    assert stdout_closed(["bench", "probe"], cwd=tmp_path) == (0, "")
