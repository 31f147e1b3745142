"""Protocol benchmark: the codec through the path a request takes vs a numpy copy, and
request/response through mosquitto vs the fastest raw paho, each figure from fresh processes.

    python -m benchmarks.protocol [--quick] [--runs N] [--json PATH]

* codec (:mod:`benchmarks._codec_bench`): ``encode_parts`` + the PUBLISH frame + ``decode`` +
  ``to_array`` vs ``arr.copy()``, cache-hot and cache-cold, in a fresh process per run;
* transport (:mod:`benchmarks._transport_bench`): async API, sync API and a blocking handler
  vs raw paho (the faster of ``loop_start`` and driven from the caller's thread), requester and
  responder as separate fresh processes per figure, interleaved in rotating order, 1 KB /
  100 KB / 1 MB, 300 round trips each. Every process of these runs, mosquitto included, gets
  ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (:data:`_transport_bench.MALLOC_ENV`),
  the fastest setting for both sides at 1 MB; two more 1 MB measurements, with glibc's
  defaults everywhere and with the variables in the clients only, show what the allocator
  costs (docs/deployment.md).

``--runs`` (default 3) repeats both; a figure is the median over the runs of each run's median,
and a target is met only when every run meets it (the notes give each run's ratio).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import _transport_bench
from benchmarks._common import Result, parser, print_table, write_json

NAME = "protocol"
ROOT = Path(__file__).resolve().parents[1]


def _codec_runs(runs: int, quick: bool) -> list[Result]:
    per_run: list[list[dict]] = []
    for _ in range(runs):
        cmd = [sys.executable, "-m", "benchmarks._codec_bench", "--emit"] + (
            ["--quick"] if quick else [])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=600, check=True)
        per_run.append([json.loads(line) for line in out.stdout.splitlines() if line.strip()])
    results: list[Result] = []
    for i, first in enumerate(per_run[0]):
        rows = [r[i] for r in per_run]
        values = [r["value"] for r in rows]
        res = Result(metric=first["metric"], value=statistics.median(values), unit=first["unit"],
                     baseline=first.get("baseline"), target=first.get("target"),
                     p99=statistics.median(r["p99"] for r in rows),
                     min=min(r["min"] for r in rows), max=max(r["max"] for r in rows),
                     n=first["n"], notes=first.get("notes"))
        if "baseline_value" in first:
            res.baseline_value = statistics.median(r["baseline_value"] for r in rows)
            ratios = [r["ratio"] for r in rows]
            res.notes = (f"{res.notes}; ratio per run {[round(x, 3) for x in ratios]} "
                         f"(min {min(ratios):.3f} / median {statistics.median(ratios):.3f} / "
                         f"max {max(ratios):.3f})")
        if first.get("met") is not None:
            res.met = all(r["met"] for r in rows)
        results.append(res)
    return results


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or NAME)
    p.add_argument("--runs", type=int, default=3, help="runs of everything (default 3)")
    args = p.parse_args(argv)
    codec = _codec_runs(args.runs, args.quick)
    print_table(f"codec: encode_parts + frame + decode vs numpy copy ({args.runs} runs)", codec)
    transport = _transport_bench.run(quick=args.quick, runs=args.runs, malloc=True)
    print_table(f"transport: request/response vs raw paho (QoS 1, mosquitto, {args.runs} runs, "
                "MALLOC_* set in every process)", transport)
    allocator = _transport_bench.allocator_effect(quick=args.quick)
    print_table("1 MB: glibc's default allocator settings / MALLOC_* in the clients only "
                "(one run each)", allocator)
    results = [*codec, *transport, *allocator]
    out = write_json(NAME, results, args.json_path,
                     notes=_transport_bench.NOTES + _transport_bench.broker_notes())
    print(f"wrote {out}")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
