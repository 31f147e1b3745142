"""Shared plumbing for benchmarks: machine description, statistics, the results JSON, and the
printed table.

Results of record live in ``benchmarks/results/<name>.json`` (tracked; the README quotes them).
A ``--quick`` run is a smoke run: it writes ``out/benchmarks/<name>.json`` (``out/`` is ignored
by git) and refuses a ``--json`` path inside ``benchmarks/results/``, so it never rewrites a
result of record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "Result",
    "Stats",
    "interleaved",
    "machine_info",
    "parser",
    "print_table",
    "stats",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_DIR = Path(__file__).resolve().parent.parent / "out" / "benchmarks"  # ignored by git

# What the running benchmark was asked (set when its arguments are parsed).
_RUN: dict = {"quick": False, "argv": None}


@dataclass
class Stats:
    median: float
    p99: float
    min: float
    max: float
    n: int


def stats(samples: list[float]) -> Stats:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, max(0, round(0.99 * (len(s) - 1))))]
    return Stats(statistics.median(s), p99, s[0], s[-1], len(s))


def interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 5
) -> dict[str, list[float]]:
    """Run each callable ``repeats`` times, interleaved A B A B …; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


@dataclass
class Result:
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    target: str | None = None
    met: bool | None = None
    p99: float | None = None
    min: float | None = None
    max: float | None = None
    n: int | None = None
    notes: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.ratio is not None:
            d["ratio"] = round(self.ratio, 4)
        return d


def machine_info(notes: str = "") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "notes": notes,
    }


def default_json_path(name: str, quick: bool) -> Path:
    """Where a run's results go without ``--json``: the result of record, or for a quick run
    the ignored ``out/benchmarks/``."""
    return (QUICK_DIR if quick else RESULTS_DIR) / f"{name}.json"


def write_json(name: str, results: list[Result], path: str | None, notes: str = "",
               extra: dict | None = None) -> Path:
    """Write the results JSON to ``path`` (default: :func:`default_json_path`); ``extra`` adds
    top-level keys of the benchmark's own (details beside the results)."""
    out = Path(path) if path else default_json_path(name, _RUN["quick"])
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if _RUN["argv"] is None else _RUN["argv"]
    doc = {
        "benchmark": name,
        "version": 1,
        "command": " ".join(["python", "-m", f"benchmarks.{name}", *argv]),
        "machine": machine_info(notes),
        "results": [r.to_json() for r in results],
        **(extra or {}),
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    return out


def print_table(title: str, results: list[Result]) -> None:
    from tandem.console import Column
    from tandem.console import print_table as show

    columns = [Column("metric"), Column("value", justify="right"),
               Column("p99", justify="right", fold=1), Column("baseline", fold=2, shorten=True),
               Column("ratio", justify="right"), Column("target", fold=3), Column("met")]
    rows = []
    for r in results:
        ratio = r.ratio
        rows.append([
            r.metric,
            f"{r.value:.4g} {r.unit}",
            "" if r.p99 is None else f"{r.p99:.4g}",
            "" if r.baseline is None else f"{r.baseline} = {r.baseline_value:.4g}",
            "" if ratio is None else f"{ratio:.3f}",
            r.target or "",
            "" if r.met is None else ("yes" if r.met else "NO"),
        ])
    show(columns, rows, title=title)


class _Parser(argparse.ArgumentParser):
    """Records what the benchmark was asked, and keeps quick runs out of the results of
    record."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns = super().parse_args(args, namespace)
        _RUN["quick"] = bool(getattr(ns, "quick", False))
        _RUN["argv"] = list(sys.argv[1:] if args is None else args)
        path = getattr(ns, "json_path", None)
        if _RUN["quick"] and path and RESULTS_DIR in Path(path).resolve().parents:
            self.error(f"--json {path}: a --quick run is a smoke run, not a result of record; "
                       f"write it outside {RESULTS_DIR}")
        return ns


def parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description)
    p.add_argument("--json", dest="json_path", help="results JSON path (default: "
                   "benchmarks/results/<name>.json; with --quick out/benchmarks/<name>.json)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions (a smoke run; never written to benchmarks/results/)")
    return p
