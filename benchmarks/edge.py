"""Edge daemon benchmark: the local API against calling the backend directly, the planner's
decision time, the time to answer when the cloud stalls, and the daemon's resident memory.

Everything runs on 127.0.0.1 in processes started and stopped here; the model is the
``residual`` example (a ~0.05 ms model, so the API's own cost dominates), compiled for ONNX
Runtime.

* ``api_overhead_{binary,json}_p50``: a ``tandem edge run`` process (no broker reachable, one
  compute thread, one intra-op thread) answering ``mode=local`` requests through the KServe v2
  API, timed from the caller with :class:`tandem.edge.Client` (binary tensors, then JSON), minus
  the same full-model ONNX Runtime artifact run by ``OnnxRuntimeBackend.infer`` in the caller
  (one intra-op thread), interleaved call by call. Target: <= 1 ms at p50.
* ``kserve_{encode,decode}_request_json``: the share of the JSON form in that overhead: the
  KServe codec encoding the request (client) and decoding it (daemon), JSON against binary;
  ``..._json_stdlib``: the same with the standard library's ``json`` (the codec's path when
  orjson is not installed), against the orjson path.
* ``planner_decide``: ``Planner.decide`` on the bundle's measured profile (every plan: local,
  cloud and each cut in each verified encoding), per call, in this process; and the mean the
  daemon itself recorded (``tandem_edge_decision_seconds``). Target: <= 50 us.
* ``stalled_cloud_answer``: mosquitto + a ``tandem cloud serve`` worker stopped with SIGSTOP;
  ``split:<k>`` requests with a 200 ms deadline, each timed from the caller; minus the deadline.
  Target: p99 <= deadline + 10 ms.
* ``daemon_rss``: the daemon's resident memory (VmRSS) with the model loaded, after the
  requests; baseline: a fresh Python process holding one ONNX Runtime session of the full model
  and one inference run.

    python -m benchmarks.edge [--quick] [--json PATH]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks._common import Result, interleaved, parser, print_table, stats, write_json

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_MS = 200.0
EDGE_ENV = {"TANDEM_ADVERTISE": "false", "TANDEM_COMPUTE_THREADS": "1",
            "TANDEM_INTRA_OP_THREADS": "1", "TANDEM_PROFILE_RUNS": "10",
            "TANDEM_PROFILE": "cpu-x86_64", "TANDEM_LOG_LEVEL": "warning",
            "TANDEM_PROBE_INTERVAL_S": "0.5", "TANDEM_CONFIG": ""}


def _compile(tmp: Path) -> Path:
    from tandem.compiler import BundleFromOnnx, CompileOptions, examples

    model = examples.save(examples.residual(), tmp / "residual.onnx")
    BundleFromOnnx(model, tmp / "residual", CompileOptions(targets=("onnxruntime",)))()
    return tmp / "residual"


def _free_port() -> int:
    from tests._support.broker import free_port

    return free_port()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-m", "tandem.cli", *args], stdout=out,
                            stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def _wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready",
                                        timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the daemon did not become ready")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _edge(bundle: Path, tmp: Path, broker: str, name: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = _start(["edge", "run", "--bundle", str(bundle), "--device-id", f"bench-{name}",
                   "--broker", broker, "--api-port", str(port), "--state-dir",
                   str(tmp / f"state-{name}")], EDGE_ENV, tmp / f"edge-{name}.log")
    _wait_ready(port, proc, tmp / f"edge-{name}.log")
    return proc, port


def _full_model_artifact(bundle: Path) -> tuple[Path, bool]:
    from tandem.protocol.bundle import open_bundle

    with open_bundle(bundle) as b:
        full = b.select("full", "onnxruntime").full
        return Path(full.path), full.optimized


def api_overhead(bundle: Path, tmp: Path, repeats: int) -> tuple[list[Result], int, int]:
    from tandem.devices.backends import OnnxRuntimeBackend
    from tandem.edge import Client

    proc, port = _edge(bundle, tmp, f"mqtt://127.0.0.1:{_free_port()}", "api")
    try:
        x = {"input": np.random.default_rng(0).standard_normal((1, 3, 16, 16))
             .astype(np.float32)}
        path, optimized = _full_model_artifact(bundle)
        binary = Client(f"http://127.0.0.1:{port}")
        plain = Client(f"http://127.0.0.1:{port}", binary=False)
        with OnnxRuntimeBackend(path, intra_op_threads=1, optimized=optimized) as direct:
            want = direct.infer(x)["logits"]
            for client in (binary, plain):
                got = client.infer(x, mode="local").outputs["logits"]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            times = interleaved({
                "direct": lambda: direct.infer(x),
                "binary": lambda: binary.infer(x, mode="local"),
                "json": lambda: plain.infer(x, mode="local"),
            }, repeats=repeats, warmup=20)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        rss = _rss_kib(proc.pid)
        binary.close()
        plain.close()
    finally:
        _stop(proc)
    decisions = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                 if line.startswith("tandem_edge_decision_seconds_")}
    mean_us = 1e6 * decisions["tandem_edge_decision_seconds_sum"] / max(
        1.0, decisions["tandem_edge_decision_seconds_count"])
    d = stats(times["direct"])
    ms = 1e3
    out = [Result("backend_infer_direct", d.median * ms, "ms", p99=d.p99 * ms, min=d.min * ms,
                  max=d.max * ms, n=d.n, notes="OnnxRuntimeBackend.infer in the caller, "
                  "full-model ORT artifact, 1 intra-op thread")]
    for kind in ("binary", "json"):
        s = stats(times[kind])
        out.append(Result(f"api_infer_{kind}", s.median * ms, "ms", baseline="backend_infer_direct",
                          baseline_value=d.median * ms, p99=s.p99 * ms, min=s.min * ms,
                          max=s.max * ms, n=s.n))
        overhead = (s.median - d.median) * ms
        out.append(Result(f"api_overhead_{kind}_p50", overhead, "ms", target="<= 1 ms",
                          met=overhead <= 1.0, notes="tandem edge run process, mode=local, "
                          "tandem.edge.Client over HTTP/1.1 keep-alive, interleaved with the "
                          "direct call"))
    out += _json_share(x)
    out.append(Result("planner_decide_in_daemon_mean", mean_us, "us", target="<= 50 us",
                      met=mean_us <= 50, notes="tandem_edge_decision_seconds sum/count "
                      "recorded by the daemon while serving the requests above"))
    return out, rss, d.n


def _json_share(x: dict[str, np.ndarray]) -> list[Result]:
    """What the JSON form alone costs on this input: the codec's encode (client) and decode
    (daemon) of the request, JSON against binary, in this process."""
    from tandem.protocol import kserve

    req = kserve.InferRequest((kserve.InferTensor.from_array("input", x["input"]),), (), None,
                              {"mode": "local"})
    bodies = {b: kserve.encode_request(req, binary=b) for b in (True, False)}
    fast = kserve._orjson

    def stdlib(fn):  # the codec as it runs where orjson is not installed
        def run():
            kserve._orjson = None
            try:
                return fn()
            finally:
                kserve._orjson = fast
        return run

    times = interleaved({
        "enc_json": lambda: kserve.encode_request(req, binary=False),
        "enc_bin": lambda: kserve.encode_request(req, binary=True),
        "dec_json": lambda: kserve.decode_request(*bodies[False]),
        "dec_bin": lambda: kserve.decode_request(*bodies[True]),
        "enc_std": stdlib(lambda: kserve.encode_request(req, binary=False)),
        "dec_std": stdlib(lambda: kserve.decode_request(*bodies[False])),
    }, repeats=300, warmup=20)
    med = {k: stats(v).median * 1e3 for k, v in times.items()}
    n = x["input"].size
    lib = "orjson" if fast is not None else "json: orjson is not installed"
    return [
        Result("kserve_encode_request_json", med["enc_json"], "ms", baseline="binary",
               baseline_value=med["enc_bin"], notes=f"{n} float32 values as JSON numbers "
               f"({lib}), in the caller"),
        Result("kserve_decode_request_json", med["dec_json"], "ms", baseline="binary",
               baseline_value=med["dec_bin"], notes="the same body parsed as the daemon does"),
        Result("kserve_encode_request_json_stdlib", med["enc_std"], "ms",
               baseline="kserve_encode_request_json", baseline_value=med["enc_json"],
               notes="the same with Python's json (the path without orjson)"),
        Result("kserve_decode_request_json_stdlib", med["dec_std"], "ms",
               baseline="kserve_decode_request_json", baseline_value=med["dec_json"],
               notes="the same with Python's json (the path without orjson)"),
    ]


def planner_time(bundle: Path, n: int) -> list[Result]:
    from tandem.devices import get_profile
    from tandem.edge import CostModel, LinkEstimator, Planner
    from tandem.edge._profiler import profile_bundle
    from tandem.edge._runtime import ModelRuntime
    from tandem.protocol.bundle import open_bundle
    from tandem.protocol.messages import CloudLoad

    with open_bundle(bundle) as b:
        rt = ModelRuntime(b, get_profile("cpu-x86_64"), intra_op_threads=1)
        rt.load()
        try:
            table = profile_bundle(rt, None, warmup=2, runs=10, progress=False)
        finally:
            rt.close()
        link = LinkEstimator(prior_uplink_mbps=20, prior_rtt_ms=10)
        link.observe_connected(True)
        link.observe_load(CloudLoad(worker_id="w", timestamp_ms=0, queue_ms=1.0, tail_ms=tuple(
            (b.manifest.source_digest, c.id, 0.02) for c in b.manifest.cuts if c.tail_part)))
        cost = CostModel(b.manifest, b.digest, table, link)
        planner = Planner(cost, link, explore_interval_s=float("inf"))
        key = ((1, 3, 16, 16),)
        samples = []
        for i in range(n):
            if i % 100 == 0:  # the link moves a little, as it does while serving
                link.rtt.add(10 + (i % 7))
            t0 = time.perf_counter()
            planner.decide(key, 100.0)
            samples.append(time.perf_counter() - t0)
        s = stats(samples[n // 10:])
        us = 1e6
        return [Result("planner_decide", s.median * us, "us", target="<= 50 us",
                       met=s.median * us <= 50, p99=s.p99 * us, min=s.min * us,
                       max=s.max * us, n=s.n,
                       notes=f"{len(cost.plans())} plans (local, cloud and "
                       f"{len(rt.interior)} cuts x verified encodings), one input shape, "
                       "auto mode, in this process")]


def stalled_cloud(bundle: Path, tmp: Path, n: int) -> tuple[list[Result], int]:
    from tandem.edge import Client
    from tests._support.broker import Mosquitto

    broker = Mosquitto(tmp / "broker")
    broker.start()
    repo = tmp / "repo"
    repo.mkdir()
    import shutil

    shutil.copytree(bundle, repo / bundle.name)
    worker = _start(["cloud", "serve", "--repo", str(repo), "--broker",
                     f"mqtt://127.0.0.1:{broker.port}", "--worker-id", "bench-w1"],
                    {"TANDEM_LOAD_INTERVAL_S": "0.2", "TANDEM_CONFIG": ""}, tmp / "worker.log")
    edge = None
    try:
        deadline = time.monotonic() + 60
        while b"serving" not in (tmp / "worker.log").read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "worker.log").read_text()[-3000:])
            time.sleep(0.05)
        edge, port = _edge(bundle, tmp, f"mqtt://127.0.0.1:{broker.port}", "stall")
        client = Client(f"http://127.0.0.1:{port}")
        plans = [p["plan"] for p in client.status()["plans"] if p["plan"].startswith("split:")]
        split = max(plans, key=lambda p: int(p.split(":")[1]))
        x = {"input": np.random.default_rng(1).standard_normal((1, 3, 16, 16))
             .astype(np.float32)}
        for _ in range(50):
            if client.infer(x, mode=split).ran == "cloud":
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the cloud never answered before the stall")
        worker.send_signal(signal.SIGSTOP)
        late = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.infer(x, mode=split, deadline_ms=DEADLINE_MS)
            wall = (time.perf_counter() - t0) * 1e3
            assert r.ran == "fallback", r.parameters
            late.append(wall - DEADLINE_MS)
        rss = _rss_kib(edge.pid)
        client.close()
    finally:
        worker.send_signal(signal.SIGCONT)
        if edge is not None:
            _stop(edge)
        _stop(worker)
        broker.stop()
    s = stats(late)
    return [Result("stalled_cloud_answer_minus_deadline", s.median, "ms",
                   target="p99 <= +10 ms", met=s.p99 <= 10.0, p99=s.p99, min=s.min, max=s.max,
                   n=s.n, notes=f"{split}, deadline {DEADLINE_MS:g} ms, worker SIGSTOPped, "
                   "client wall time minus the deadline (negative: early)")], rss


def baseline_rss(bundle: Path) -> int:
    path, _ = _full_model_artifact(bundle)
    code = (
        "import numpy as np, onnxruntime as ort\n"
        "so = ort.SessionOptions(); so.intra_op_num_threads = 1\n"
        f"s = ort.InferenceSession({str(path)!r}, so, providers=['CPUExecutionProvider'])\n"
        "s.run(None, {'input': np.zeros((1, 3, 16, 16), np.float32)})\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n")
    return int(subprocess.check_output([sys.executable, "-c", code], cwd=ROOT).strip())


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    repeats = 60 if args.quick else 400
    with tempfile.TemporaryDirectory(prefix="tandem-bench-edge-") as t:
        tmp = Path(t)
        bundle = _compile(tmp)
        results, rss_api, _ = api_overhead(bundle, tmp, repeats)
        results += planner_time(bundle, 2000 if args.quick else 20000)
        stall, rss_stall = stalled_cloud(bundle, tmp, 10 if args.quick else 40)
        results += stall
        base = baseline_rss(bundle)
        mib = 1 / 1024
        results += [
            Result("daemon_rss_local_only", rss_api * mib, "MiB", baseline="ort_session_rss",
                   baseline_value=base * mib, notes="after the API requests; no broker"),
            Result("daemon_rss_connected", rss_stall * mib, "MiB", baseline="ort_session_rss",
                   baseline_value=base * mib, notes="after the stall run; connected to "
                   "mosquitto, every part of 5 cuts loaded"),
            Result("ort_session_rss", base * mib, "MiB", notes="fresh python + numpy + "
                   "onnxruntime, one session of the full model, one run"),
        ]
    print_table("edge daemon", results)
    notes = ("shared 2-core machine (several engineers at work): figures are indicative; "
             "CPU only, no GPU figure")
    path = write_json("edge", results, args.json_path, notes=notes)
    print(f"wrote {path}")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
