"""Compile benchmark: `tandem compile` of a ~700-node model (analysis, ≤ 8 cuts extracted,
verified raw/fp16/int8, ORT-lowered, bundle written) on this machine, with peak memory.

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
    from compiler import BundleFromOnnx, CompileOptions
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


def run(quick: bool, nodes: int = 700) -> list[Result]:
    import onnx

    from compiler._examples import big_model

    reps = 3 if quick else 7
    with tempfile.TemporaryDirectory(prefix="tandem-bench-compile-") as tmp:
        model_path = Path(tmp) / "big.onnx"
        model = big_model(n_nodes=nodes)
        onnx.save_model(model, str(model_path))
        n_nodes = len(model.graph.node)
        comp, base = [], []
        for i in range(reps):  # interleaved A B A B
            comp.append(_child("compile", model_path, Path(tmp) / f"b{i}"))
            base.append(_child("baseline", model_path, Path(tmp) / "unused"))
    c = stats([r["seconds"] for r in comp])
    b = stats([r["seconds"] for r in base])
    rss = max(r["peak_rss_mib"] for r in comp)
    notes = f"{n_nodes} ONNX nodes, {comp[0]['cuts']} cuts kept, target onnxruntime, 1 ORT thread"
    return [
        Result("compile_700_nodes", c.median, "s", baseline="load_plus_ort_session",
               baseline_value=b.median, target=f"value <= {TARGET_S} s",
               met=c.median <= TARGET_S, p99=c.p99, min=c.min, max=c.max, n=c.n, notes=notes),
        Result("compile_700_nodes_peak_rss", rss, "MiB",
               baseline="load_plus_ort_session_peak_rss",
               baseline_value=max(r["peak_rss_mib"] for r in base), n=len(comp)),
    ]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or NAME)
    p.add_argument("--nodes", type=int, default=700)
    args = p.parse_args(argv)
    results = run(args.quick, args.nodes)
    print_table("compile: ~700-node model, <= 8 cuts, verified and lowered", results)
    out = write_json(NAME, results, args.json_path, notes=results[0].notes or "")
    print(f"wrote {out}")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
