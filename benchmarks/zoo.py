"""Zoo benchmark: `tandem compile` on real architectures (random weights), one table.

Models (exported by ``benchmarks/_zoo_export.py`` into the git-ignored ``benchmarks/zoo_models/``;
torch is not a dependency of Tandem: with the models missing, pass ``--torch-python PY``, an
interpreter that has torch, torchvision and transformers, and they are exported first):
resnet18, mobilenet_v3_small, efficientnet_b0, deeplabv3_mobilenet_v3_large (dynamic H/W,
compiled with ``input=1x3x512x512``), vit_small, bert_small (compiled at sequence 128), and the
U-Net example of ``tandem example unet``.

For each model, in a fresh process per compile (so peak RSS is that compile's own), interleaved
with the baseline (load the model and build one ONNX Runtime session, what any tool pays):

- nodes, GFLOPs at the compiled input shapes;
- cuts kept by a default compile (target ``onnxruntime``, max 8 split points, at most 2 tensors
  per cut) and how many of them the min-cut found (``mc``) that the sweep did not;
- the smallest frontier bytes with at most 25 / 50 / 75 % of the FLOPs on the edge, among every
  boundary of the order ("sweep", any number of tensors) and among those plus the minimum cuts
  for a dense range of prices (60 values of ``lambda``, the FLOP price in bytes, from 1e-12 to
  1e3: "min-cut"), so the gain of min-cut partitions is visible where it exists;
- verification: the worst raw error of any kept cut (max abs, relative to the output's scale) and
  the worst fp16 SNR; warnings verification gave (constant or tiny outputs);
- compile time (median of the repetitions) and peak RSS (max), baseline time;
- bundle size against the model file (weights stored once: the target is <= 1.5x);
- max-flow time per minimum cut with scipy (used) and networkx (the alternative), median.

    python -m benchmarks.zoo [--quick] [--json PATH] [--only NAME ...] [--torch-python PY]

Figures are medians on a 2-core machine shared with other work: indicative, not a lab result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import Result, parser, stats, write_json

NAME = "zoo"
HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE / "zoo_models"
TARGET_S = 30.0
TARGET_RATIO = 1.5

ZOO = {
    "resnet18": None,
    "mobilenet_v3_small": None,
    "efficientnet_b0": None,
    "deeplabv3_mobilenet_v3_large": {"input": [1, 3, 512, 512]},
    "vit_small": None,
    "bert_small": {"input_ids": [1, 128]},
    "unet_example": None,
}

_CHILD = r"""
import json, os, resource, sys, time, warnings
mode, model, out, shapes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
t0 = time.perf_counter()
if mode == "baseline":
    import onnx, onnxruntime as ort
    m = onnx.load(model)
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    sys.exit(0)
from tandem.compiler import BundleFromOnnx, CompileOptions
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opts = CompileOptions(targets=("onnxruntime",), input_shapes=shapes or None)
    r = BundleFromOnnx(model, out, opts)()
seconds = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_SELF)
rss = usage.ru_maxrss / 1024
cpu = usage.ru_utime + usage.ru_stime
size = sum(f.stat().st_size for f in __import__("pathlib").Path(out).rglob("*") if f.is_file())
cuts = []
for rep in r.cuts:
    v = rep.verification
    cuts.append({
        "id": rep.cut.id, "share": rep.cut.head_share, "bytes": rep.cut.frontier_bytes,
        "tensors": len(rep.cut.frontier),
        "methods": sorted({o.method for o in rep.cut.origins}),
        "raw_max_abs": v.raw.max_abs_err if v.raw else None,
        "raw_max_rel": v.raw.max_rel_err if v.raw else None,
        "fp16_snr_db": v.encodings["fp16"].min_snr_db if "fp16" in v.encodings else None,
        "encodings": list(v.usable_encodings)})
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": rss,
                  "bundle_bytes": size, "model_bytes": os.path.getsize(model),
                  "nodes": r.n_nodes, "flops": r.total_flops, "cuts": cuts,
                  "warnings": [str(w.message) for w in caught],
                  "input_shapes": {k: list(v) for k, v in r.manifest.input_shapes.items()}}))
"""

_ANALYSIS = r"""
import json, sys, time
import numpy as np
from tandem.compiler._cuts import boundary_frontiers, cut_from_head, Cut
from tandem.compiler._graph import analyze, input_specs, load_model, unresolved_tensors
from tandem.compiler._mincut import min_cut, regimes
from tandem.compiler._shapes import name_input_dims, resolve_input_shapes
from tandem.compiler._verify import measure_shapes, random_samples, input_ranges
model_path, shapes = sys.argv[1], json.loads(sys.argv[2])
model = load_model(model_path)
name_input_dims(model)
specs = input_specs(model)
sizes = resolve_input_shapes(specs, shapes or None).shapes
info = analyze(model, input_shapes=sizes)
todo = unresolved_tensors(model, info)
if todo:
    sample = random_samples(specs, 1, shapes=sizes, ranges=input_ranges(model))[0]
    info = analyze(model, input_shapes=sizes, measured=measure_shapes(model, todo, sample))
n = len(info.compute_nodes)
total = sum(node.flops for node in info.compute_nodes)
cut0 = sum(info.nbytes(t) for t in info.inputs)
sweep = [(c.head_flops, c.frontier_bytes) for c in boundary_frontiers(info, 10**6)]
mincut = []
timing = {"scipy": [], "networkx": []}
for lam in np.logspace(-12, 3, 60):
    t = time.perf_counter(); head = min_cut(info, float(lam), solver="scipy")
    timing["scipy"].append(time.perf_counter() - t)
    if 0 < len(head) < n:
        c = cut_from_head(info, head, cut_id=-1)
        mincut.append((c.head_flops, c.frontier_bytes, c.is_prefix))
for regime in regimes():
    t = time.perf_counter(); min_cut(info, regime.bytes_per_flop, solver="networkx")
    timing["networkx"].append(time.perf_counter() - t)
def best(points, share):
    ok = [b for f, b, *_ in points if f <= share * total]
    return min([cut0, *ok])
out = {"cut0_bytes": cut0, "sweep": {}, "mincut": {}, "nonprefix_mincuts":
       len({(f, b) for f, b, p in mincut if not p}),
       "maxflow_ms": {k: 1000 * sorted(v)[len(v) // 2] for k, v in timing.items()},
       "vertices": n + len(info.tensors)}
for share in (0.25, 0.5, 0.75):
    out["sweep"][str(share)] = best(sweep, share)
    out["mincut"][str(share)] = best(sweep + [(f, b) for f, b, _ in mincut], share)
print(json.dumps(out))
"""


def _python(code: str, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode:
        raise SystemExit(f"child failed ({' '.join(args[:2])}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ensure_models(names: list[str], torch_python: str | None) -> None:
    missing = [n for n in names if n != "unet_example" and not (MODELS_DIR / f"{n}.onnx").exists()]
    if missing:
        if not torch_python:
            raise SystemExit(
                f"zoo models missing in {MODELS_DIR}: {', '.join(missing)}.\nExport them with an "
                "interpreter that has torch, torchvision and transformers:\n  "
                f"PY benchmarks/_zoo_export.py {MODELS_DIR}\nor pass --torch-python PY")
        subprocess.run([torch_python, str(HERE / "_zoo_export.py"), str(MODELS_DIR), "--only",
                        *missing], check=True)
    if "unet_example" in names and not (MODELS_DIR / "unet_example.onnx").exists():
        from tandem.compiler.examples import save, unet

        MODELS_DIR.mkdir(parents=True, exist_ok=True)
        save(unet(), MODELS_DIR / "unet_example.onnx")


def _one(name: str, shapes: dict | None, reps: int, tmp: Path) -> dict:
    model = MODELS_DIR / f"{name}.onnx"
    arg = json.dumps(shapes or {})
    runs, base = [], []
    for i in range(reps):  # interleaved A B A B
        runs.append(_python(_CHILD, "compile", str(model), str(tmp / f"{name}{i}"), arg))
        base.append(_python(_CHILD, "baseline", str(model), "-", arg))
    analysis = _python(_ANALYSIS, str(model), arg)
    first = runs[0]
    cuts = first["cuts"]
    interior = [c for c in cuts if 0 < c["share"] < 1 or (c["tensors"] and c["share"] > 0)]
    raw = [c["raw_max_rel"] for c in cuts if c["raw_max_rel"] is not None]
    snr = [c["fp16_snr_db"] for c in interior if c["fp16_snr_db"] is not None]
    return {
        "model": name,
        "input_shapes": first["input_shapes"],
        "nodes": first["nodes"],
        "gflops": first["flops"] / 1e9,
        "cuts": len(cuts),
        "interior_cuts": len(interior),
        "mincut_cuts": sum("mincut" in c["methods"] and "sweep" not in c["methods"]
                           for c in interior),
        "cut0_bytes": analysis["cut0_bytes"],
        "best_bytes_sweep": analysis["sweep"],
        "best_bytes_mincut": analysis["mincut"],
        "nonprefix_mincuts": analysis["nonprefix_mincuts"],
        "maxflow_ms": analysis["maxflow_ms"],
        "flow_vertices": analysis["vertices"],
        "worst_raw_rel_err": max(raw, default=0.0),
        "worst_fp16_snr_db": min(snr, default=None),
        "warnings": first["warnings"],
        "compile_s": stats([r["seconds"] for r in runs]).__dict__,
        "compile_cpu_s": stats([r["cpu_seconds"] for r in runs]).median,
        "baseline_s": stats([b["seconds"] for b in base]).__dict__,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "bundle_bytes": first["bundle_bytes"],
        "model_bytes": first["model_bytes"],
        "bundle_ratio": first["bundle_bytes"] / first["model_bytes"],
    }


def _kib(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1048576:.2f} MiB"


def table(rows: list[dict]) -> str:
    """The README table (Markdown)."""
    head = ("| model | nodes | GFLOPs | cuts (sweep / min-cut) | best bytes ≤25 % / ≤50 % / ≤75 % "
            "head FLOPs, sweep → with min-cut | worst raw err (rel) | compile s, median wall "
            "(CPU) | peak RSS | bundle / model |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        best = " / ".join(
            f"{_kib(r['best_bytes_sweep'][s])}" + (
                "" if r["best_bytes_mincut"][s] >= 0.995 * r["best_bytes_sweep"][s]
                else f" → **{_kib(r['best_bytes_mincut'][s])}**")
            for s in ("0.25", "0.5", "0.75"))
        notes = sorted({"constant output" if "constant" in w else "tiny output"
                        for w in r["warnings"] if "constant" in w or "too small" in w})
        err = f"{r['worst_raw_rel_err']:.1e}" + (f" ({', '.join(notes)})" if notes else "")
        swept = r["interior_cuts"] - r["mincut_cuts"]
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['gflops']:.2f} | {swept} / {r['mincut_cuts']} | "
            f"{best} | {err} | {r['compile_s']['median']:.1f} "
            f"({r['compile_cpu_s']:.1f}) | "
            f"{r['peak_rss_mib']:.0f} MiB | {_kib(r['bundle_bytes'])} / "
            f"{_kib(r['model_bytes'])} = {r['bundle_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or NAME)
    p.add_argument("--only", nargs="*", choices=list(ZOO), help="only these models")
    p.add_argument("--torch-python", help="python with torch/torchvision/transformers, to "
                   "export missing zoo models")
    args = p.parse_args(argv)
    names = args.only or list(ZOO)
    _ensure_models(names, args.torch_python)
    reps = 1 if args.quick else 3
    rows, results = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-zoo-") as tmp:
        for name in names:
            row = _one(name, ZOO[name], reps, Path(tmp))
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("model", "nodes", "cuts", "bundle_ratio")}
                             | {"compile_s": row["compile_s"]["median"]}), flush=True)
            c, b = row["compile_s"], row["baseline_s"]
            results += [
                Result(f"compile_s_{name}", c["median"], "s", baseline="load_plus_ort_session",
                       baseline_value=b["median"], target=f"value <= {TARGET_S} s",
                       met=c["median"] <= TARGET_S, p99=c["p99"], min=c["min"], max=c["max"],
                       n=c["n"]),
                Result(f"bundle_ratio_{name}", row["bundle_ratio"], "x",
                       target=f"value <= {TARGET_RATIO}", met=row["bundle_ratio"] <= TARGET_RATIO,
                       notes=f"bundle {row['bundle_bytes']} B, model {row['model_bytes']} B"),
                Result(f"peak_rss_{name}", row["peak_rss_mib"], "MiB"),
            ]
    print()
    print(table(rows))
    out = write_json(
        NAME, results, args.json_path,
        notes=f"{reps} compile(s) per model, fresh process each, interleaved with the baseline; "
              "machine shared with other work: medians are indicative; total "
              f"{time.perf_counter() - t0:.0f} s",
        extra={"models": rows, "table": table(rows)})
    print(f"wrote {out}")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
