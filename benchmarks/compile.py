"""Compile benchmark: `tandem compile` of ~700-node models (analysis, ≤ 8 split points
extracted, verified raw/fp16/int8, ORT-lowered, bundle written) on this machine, with peak memory.

Two models of 698 nodes (residual CNN blocks + transformer blocks, compiler/_examples.py):
``small`` (0.12 GFLOP, the test model) and ``wide`` (width 32, 112x112 input: 6.9 GFLOP, more
compute than ResNet-50 at 224x224), so the figure is not just graph bookkeeping.

Each run is a fresh subprocess so peak RSS is that compile's own. The baseline, run interleaved,
is what any tool must pay for this model anyway: load it and build one ONNX Runtime session.

    python -m benchmarks.compile [--quick] [--json PATH] [--nodes 700]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import Result, parser, print_table, stats, write_json

NAME = "compile"
TARGET_S = 30.0

_CHILD = r"""
import json, resource, sys, time
mode, model, out = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "compile":
    from tandem.compiler import BundleFromOnnx, CompileOptions
    r = BundleFromOnnx(model, out, CompileOptions(targets=("onnxruntime",), max_cuts=8))()
    extra = {"cuts": len(r.manifest.cuts), "nodes": r.n_nodes}
else:
    import onnx, onnxruntime as ort
    m = onnx.load(model)
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    extra = {}
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
print(json.dumps({"seconds": dt, "peak_rss_mib": rss, **extra}))
"""


def _child(mode: str, model: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(model), str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


MODELS = {"": {}, "_wide": {"width": 32, "image": 112}}  # metric suffix -> big_model kwargs


def _one(tmp: Path, suffix: str, kwargs: dict, nodes: int, reps: int) -> list[Result]:
    import onnx

    from tandem.compiler._graph import analyze
    from tandem.compiler.examples import big_model

    model_path = tmp / f"big{suffix}.onnx"
    model = big_model(n_nodes=nodes, **kwargs)
    onnx.save_model(model, str(model_path))
    n_nodes, gflop = len(model.graph.node), analyze(model).total_flops / 1e9
    comp, base = [], []
    for i in range(reps):  # interleaved A B A B
        comp.append(_child("compile", model_path, tmp / f"b{suffix}{i}"))
        base.append(_child("baseline", model_path, tmp / "unused"))
    c = stats([r["seconds"] for r in comp])
    b = stats([r["seconds"] for r in base])
    notes = (f"{n_nodes} ONNX nodes, {gflop:.2g} GFLOP, {comp[0]['cuts']} cuts kept, "
             "target onnxruntime, 1 ORT thread")
    return [
        Result(f"compile_700_nodes{suffix}", c.median, "s", baseline="load_plus_ort_session",
               baseline_value=b.median, target=f"value <= {TARGET_S} s",
               met=c.median <= TARGET_S, p99=c.p99, min=c.min, max=c.max, n=c.n, notes=notes),
        Result(f"compile_700_nodes{suffix}_peak_rss", max(r["peak_rss_mib"] for r in comp),
               "MiB", baseline="load_plus_ort_session_peak_rss",
               baseline_value=max(r["peak_rss_mib"] for r in base), n=len(comp)),
    ]


def run(quick: bool, nodes: int = 700) -> list[Result]:
    reps = 3 if quick else 7
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tandem-bench-compile-") as tmp:
        for suffix, kwargs in MODELS.items():
            results += _one(Path(tmp), suffix, kwargs, nodes, reps)
    return results


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or NAME)
    p.add_argument("--nodes", type=int, default=700)
    args = p.parse_args(argv)
    results = run(args.quick, args.nodes)
    print_table("compile: ~700-node model, <= 8 cuts, verified and lowered", results)
    out = write_json(NAME, results, args.json_path,
                     notes="; ".join(r.notes for r in results if r.notes))
    print(f"wrote {out}")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
