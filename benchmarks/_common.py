"""Shared plumbing for benchmarks: machine description, statistics, the results JSON (see
../shared/BENCHMARKS.md), and the printed table."""

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


def write_json(name: str, results: list[Result], path: str | None, notes: str = "") -> Path:
    """Write the results JSON to ``path`` (default benchmarks/results/<name>.json)."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "version": 1,
        "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{name}", *sys.argv[1:]]),
        "machine": machine_info(notes),
        "results": [r.to_json() for r in results],
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    return out


def print_table(title: str, results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "value", "p99", "baseline", "ratio", "target", "met"):
        table.add_column(col)
    for r in results:
        ratio = r.ratio
        table.add_row(
            r.metric,
            f"{r.value:.4g} {r.unit}",
            "" if r.p99 is None else f"{r.p99:.4g}",
            "" if r.baseline is None else f"{r.baseline} = {r.baseline_value:.4g}",
            "" if ratio is None else f"{ratio:.3f}",
            r.target or "",
            "" if r.met is None else ("yes" if r.met else "NO"),
        )
    Console().print(table)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", dest="json_path", help="results JSON path "
                   "(default: benchmarks/results/<name>.json)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    return p
