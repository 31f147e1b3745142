"""The benchmarks' charts: each writes one PNG (and nothing else) that holds what it was given,
and a missing matplotlib is named with the command that installs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the bench extra (matplotlib) is not installed")

from benchmarks import _plots

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _only(tmp_path: Path, name: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left


def test_grouped_bars_with_marks_errors_and_missing_cells(tmp_path):
    groups = ["3g", "lte", "wifi", "wired"]
    series = ["local", "split:15", "cloud", "auto"]
    values = {(g, s): 10.0 * (i + 1) * (j + 1) for i, g in enumerate(groups)
              for j, s in enumerate(series) if (g, s) != ("3g", "cloud")}
    out = _plots.grouped_bars(
        tmp_path / "bars.png", groups, series, values, title="latency", ylabel="ms",
        errors={k: v * 1.5 for k, v in values.items()},
        marks={"auto": {g: "auto" for g in groups}, "oracle": {"3g": "local", "lte": "cloud"}},
        log_y=True, footnote="2 shared cores")
    assert out == tmp_path / "bars.png"
    width, height = _png_size(out)
    assert width > 400 and height > 300
    _only(tmp_path, "bars.png")


def test_lines_with_panels_diagonal_and_unsorted_points(tmp_path):
    out = _plots.lines(
        tmp_path / "l.png", {"up": ([100, 1, 6], [99, 1, 6]), "down": ([1, 6, 100], [1, 6, 98])},
        title="rate", xlabel="configured", ylabel="achieved", diagonal=True, log_x=True,
        log_y=True, reference=("down",), panels=[{"series": {"p50": ([2, 100], [2.4, 101])},
                             "errors": {"p50": [3, 105]}, "title": "rtt", "xlabel": "ms",
                             "ylabel": "ms"}])
    width, _ = _png_size(out)
    assert width > 800  # two panels side by side
    _only(tmp_path, "l.png")


def test_timeline_and_heatmap(tmp_path):
    _plots.timeline(tmp_path / "t.png", step_x=[0, 10, 20], step_y=[20, 0.5, 20],
                    step_label="Mbit/s", events_x=[1, 11, 21, 22], events_y=[30, 300, 31, 29],
                    events_kind=["split:15", "local", "split:15", "cloud"],
                    events_label="latency (ms)", title="plan over time")
    _plots.heatmap(tmp_path / "h.png", ["mobilenet", "zoo"], ["3g", "lte"],
                   {("mobilenet", "3g"): 0.02, ("zoo", "lte"): 0.15}, title="regret",
                   threshold=0.1)
    assert _png_size(tmp_path / "t.png")[0] > 0 and _png_size(tmp_path / "h.png")[0] > 0


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "is-a-directory.png"
    target.mkdir()
    with pytest.raises(OSError):
        _plots.lines(target, {"a": ([1], [1])}, title="t", xlabel="x", ylabel="y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["is-a-directory.png"]


def test_without_matplotlib_the_extra_is_named():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        from benchmarks import _plots
        from tandem.protocol.errors import MissingDependency
        try:
            _plots.lines("x.png", {"a": ([1], [1])}, title="t", xlabel="x", ylabel="y")
        except MissingDependency as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert "bench" in out.stdout and "pip install" in out.stdout, out.stderr
