"""OnnxRuntimeBackend.infer overhead vs a raw InferenceSession.run on the same part and inputs.

Both run in the same process, interleaved call by call (A B A B ...), after warm-up, on a small
part (~0.1 ms) and a medium part (a few ms). Overhead = median(ours) - median(raw); the target is
overhead <= 5% of the raw median + 50 us. CPU only; no GPU figure is measured here.
"""

from __future__ import annotations

import sys

import numpy as np

from benchmarks._common import Result, interleaved, parser, print_table, stats, write_json

__all__ = ["main"]


def _mlp(width: int, depth: int, seed: int = 0) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == depth - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(ir_version=8, graph=graph,
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


# (name, width, depth, batch): sized for ~0.1 ms and a few ms on one core of a server CPU.
CASES = [
    ("small", 256, 8, 8),
    ("medium", 512, 8, 64),
]


def run_case(name: str, width: int, depth: int, batch: int, repeats: int) -> list[Result]:
    import onnxruntime as ort

    from tandem.devices.backends.onnxruntime import OnnxRuntimeBackend

    model = _mlp(width, depth)
    x = np.random.default_rng(1).standard_normal((batch, width))
    feeds = {"x": x.astype(np.float32)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    raw = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in raw.get_outputs()]
    with OnnxRuntimeBackend(model, intra_op_threads=1) as ours:
        np.testing.assert_allclose(ours.infer(feeds)["y"], raw.run(out_names, feeds)[0],
                                   rtol=1e-5, atol=1e-5)
        times = interleaved({"raw": lambda: raw.run(out_names, feeds),
                             "ours": lambda: ours.infer(feeds)}, repeats=repeats, warmup=20)
    s_raw, s_ours = stats(times["raw"]), stats(times["ours"])
    overhead = s_ours.median - s_raw.median
    budget = 0.05 * s_raw.median + 50e-6
    us = 1e6
    return [
        Result(f"ort_session_run_{name}", s_raw.median * us, "us",
               p99=s_raw.p99 * us, min=s_raw.min * us, max=s_raw.max * us, n=s_raw.n),
        Result(f"backend_infer_{name}", s_ours.median * us, "us",
               baseline=f"ort_session_run_{name}", baseline_value=s_raw.median * us,
               p99=s_ours.p99 * us, min=s_ours.min * us, max=s_ours.max * us, n=s_ours.n),
        Result(f"backend_overhead_{name}", overhead * us, "us",
               target=f"<= 5% + 50us = {budget * us:.1f} us", met=overhead <= budget,
               notes=f"MatMul+Relu x{depth}, width {width}, batch {batch}, 1 intra-op "
               "thread, interleaved, CPU only"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    repeats = 50 if args.quick else 400
    results: list[Result] = []
    for case in CASES:
        results += run_case(*case, repeats=repeats)
    print_table("OnnxRuntimeBackend.infer vs InferenceSession.run", results)
    path = write_json("backend", results, args.json_path,
                      notes="shared 2-core machine; interleaved runs")
    print(f"wrote {path}")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
