"""Cloud endpoint benchmark: ``tandem cloud serve`` against raw ONNX Runtime, on CPU.

Everything runs in separate processes on 127.0.0.1, started and stopped here: one mosquitto
(``set_tcp_nodelay true``, deep queues), the worker(s) (``python -m tandem.cli cloud serve``),
the load client (``--role client``: raw paho keeping C requests in flight with as little work
as possible — one request encoded once, a fresh id patched in per send, the next one sent from
the response callback — each timed from its publish to its answer) and the raw ONNX Runtime
baseline (``--role raw``: a fresh process timing ``InferenceSession.run`` from the caller, right
after each endpoint run, at batch 1 and at the batch size the worker ran, with 1 intra-op
thread and with ORT's default, the faster kept, so both sides see the same machine load). The
worker runs ONNX Runtime with its default threads (``--worker-threads N`` to change). Tails:

* ``light``: the tail of cut 5 of the ``dynamic_batch`` example (GlobalAveragePool output ->
  MatMul; a few hundred FLOPs): per-call overhead dominates;
* ``heavy``: a 3-conv CNN (64 channels) on 16x32x32 inputs with a dynamic batch dim (~170 MFLOP
  per sample, about 1.5 ms on one core of the reference machine,
  built here with onnx.helper because no example model is both heavy and batchable), whole
  model = the tail of cut 0: compute dominates.

Figures (BENCHMARKS.md: each next to its baseline of the same run):

* ``<tail>_<batching>_c<C>_throughput``: requests/s at concurrency C (1, 8, 32), batching
  ``on`` (max batch 32, max delay 2 ms) or ``off`` (max batch 1) — against raw ORT's
  samples/s at the worker's measured mean batch size (``/metrics``). Target at C=32:
  ratio >= 0.85;
* ``<tail>_on_c1_p50``: p50 at concurrency 1 against raw ORT's batch-1 p50 + max delay + 1 ms
  (target ratio <= 1);
* ``<tail>_batching_gain_c32``: batching on / off throughput at C=32, the mean of two runs each
  interleaved on, off, on, off (target >= 1.3 on the light tail, >= 1.0 on the heavy one);
* ``heavy_two_workers``: two workers vs one (one intra-op thread each, batching on, C=32):
  target >= 1.6.

    python -m benchmarks.cloud [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks._common import Result, parser, print_table, stats, write_json

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH_ON = 32
MAX_DELAY_MS = 2.0
CONCURRENCY = (1, 8, 32)
HEAVY_CHANNELS = (64, 64, 64)  # 3x3 convs on 16x32x32: ~170 MFLOP per sample
# The worker's ONNX Runtime intra-op threads (0: ORT's default, one per core), as raw ORT's
# fastest setting here; raw ORT is timed at 1 thread and at its default and the faster is the
# baseline (the 1-thread figure is kept in the notes). --worker-threads 1 measures a worker that
# leaves a core to its event loop (~0.9-1.05 of raw ORT at 1 thread on the heavy tail).
ENDPOINT_THREADS = 0


# -- models -----------------------------------------------------------------------------------


def _heavy_model():
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x, c_in = "x", 16
    for i, c_out in enumerate(HEAVY_CHANNELS):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(c_in * 9)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x, c_in = f"r{i}", c_out
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    inits.append(numpy_helper.from_array(np.array([-1, c_in], np.int64), "shape"))
    nodes.append(helper.make_node("Reshape", ["gap", "shape"], ["flat"]))
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((c_in, 10)) * 0.1).astype(np.float32), "fc"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc"], ["y"]))
    graph = helper.make_graph(
        nodes, "heavy",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16, 32, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _prepare(tmp: Path) -> dict[str, dict]:
    """Compile the two bundles into tmp/repo; returns per tail: digest, cut, input, tail path."""
    from tandem.compiler import BundleFromOnnx, CompileOptions, examples
    from tandem.protocol.bundle import load_bundle

    repo = tmp / "repo"
    repo.mkdir()
    tails = {}
    for tail, model, cut_pick in (("light", examples.dynamic_batch(), "interior"),
                                  ("heavy", _heavy_model(), "zero")):
        path = examples.save(model, tmp / f"{tail}.onnx")
        BundleFromOnnx(path, repo / tail, CompileOptions(targets=("onnxruntime",)))()
        with load_bundle(repo / tail) as b:
            m = b.manifest
            cuts = [c for c in m.cuts if c.tail_part is not None]
            cut = cuts[-1] if cut_pick == "interior" else cuts[0]
            (frontier,) = cut.frontier
            art = m.artifacts_for(cut.tail_part, target="onnxruntime")
            tails[tail] = {
                "digest": m.source_digest, "cut": cut.id, "model": tail,
                "input": frontier.name,
                "shape": [1 if not isinstance(d, int) else d for d in frontier.shape],
                "onnx": str(b.path_of(art[0].path if art else cut.tail_part)),
                "optimized": bool(art),
            }
    return tails


# -- roles (each in its own process) ------------------------------------------------------------


def _role_raw(args: argparse.Namespace) -> None:
    """Time InferenceSession.run from the caller: per batch size, seconds per call."""
    import onnxruntime as ort

    shape = json.loads(args.shape)
    out = {}
    for threads in json.loads(args.threads):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        if args.optimized:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(args.onnx, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for batch in json.loads(args.batches):
            x = np.random.default_rng(0).standard_normal([batch, *shape[1:]]).astype(np.float32)
            feeds = {name: x}
            for _ in range(20):
                sess.run(None, feeds)
            samples, end = [], time.perf_counter() + args.seconds
            while time.perf_counter() < end or len(samples) < 30:
                t0 = time.perf_counter()
                sess.run(None, feeds)
                samples.append(time.perf_counter() - t0)
            out[f"{threads}:{batch}"] = samples
    print(json.dumps(out))


def _role_client(args: argparse.Namespace) -> None:
    """Keep C requests in flight with as little client work as possible: raw paho (MQTT 5,
    QoS 1, its own network thread), one request encoded once with each send patching in a
    fresh 16-byte id (the worker dedups by id), the next request sent from the response
    callback. Each request is timed from its publish to its answer's arrival."""
    import os
    import threading

    import paho.mqtt.client as mqtt

    from tandem.protocol import InferenceRequest, Tensor, codec

    tail = json.loads(args.tail)
    x = np.random.default_rng(1).standard_normal(tail["shape"]).astype(np.float32)
    marker = b"TANDEM-BENCH-ID!"
    template = bytearray(codec.encode(InferenceRequest(
        id=marker, device_id="bench", model_digest=tail["digest"], cut_id=tail["cut"],
        budget_ms=10_000, tensors=(Tensor.from_array(tail["input"], x),))))
    at = template.find(marker)
    topic = f"tandem/v1/req/bench/{tail['model']}"
    sent: dict[bytes, float] = {}
    lat: list[float] = []
    state = {"measuring": False, "stop_at": float("inf"), "errors": 0, "open": 0}
    lock = threading.Lock()
    finished = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(0)  # never hold our own requests back

    def send() -> None:
        rid = os.urandom(16)
        template[at:at + 16] = rid
        payload = bytes(template)
        with lock:
            sent[rid] = time.perf_counter()
            state["open"] += 1
        client.publish(topic, payload, qos=1)

    def on_message(c, userdata, msg) -> None:
        now = time.perf_counter()
        info = codec.peek(msg.payload)
        with lock:
            t0 = sent.pop(info.id, None)
            if t0 is None:
                return
            state["open"] -= 1
            if info.type is not codec.MessageType.INFERENCE_RESPONSE or \
                    codec.decode(msg.payload).error is not None:
                state["errors"] += 1
            elif state["measuring"] and now < state["stop_at"]:
                lat.append(now - t0)
            again = now < state["stop_at"]
            if not again and state["open"] == 0:
                finished.set()
        if again:
            send()

    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    client.subscribe("tandem/v1/resp/bench", qos=1)
    client.loop_start()
    time.sleep(0.2)
    for _ in range(args.concurrency):
        send()
    time.sleep(args.warmup)
    with lock:
        lat.clear()
        state["measuring"] = True
        started = time.perf_counter()
        state["stop_at"] = started + args.seconds
    finished.wait(args.seconds + 30)
    client.loop_stop()
    client.disconnect()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"n": len(lat), "elapsed": args.seconds, "latencies": lat,
                      "errors": state["errors"], "client_cpu_s": ru.ru_utime + ru.ru_stime}))


def _run_role(*args: str, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cloud", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"role {args[:2]} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the endpoint -------------------------------------------------------------------------------


class _Worker:
    def __init__(self, tmp: Path, broker_port: int, name: str, *options: str,
                 env: dict[str, str] | None = None) -> None:
        self.log = tmp / f"{name}.log"
        self._f = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "cloud", "serve", "--repo", str(tmp / "repo"),
             "--broker", f"mqtt://127.0.0.1:{broker_port}", "--worker-id", name,
             "--http-port", "0", "--log-level", "info", *options],
            cwd=ROOT, stdout=self._f, stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None)
        deadline = time.monotonic() + 60
        while "serving $share" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.port = int(re.search(r"HTTP on http://127\.0\.0\.1:(\d+)",
                                  self.log.read_text()).group(1))

    def batches(self) -> tuple[float, float]:
        """(sum of batch sizes, number of batches) so far, over every part."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                      timeout=10).read().decode()
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith("tandem_cloud_batch_size_sum"):
                total += float(line.split()[-1])
            elif line.startswith("tandem_cloud_batch_size_count"):
                count += float(line.split()[-1])
        return total, count

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._f.close()


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client(broker_port: int, tail: dict, concurrency: int, seconds: float) -> dict:
    return _run_role("--role", "client", "--port", str(broker_port), "--tail", json.dumps(tail),
                     "--concurrency", str(concurrency), "--seconds", str(seconds),
                     "--warmup", "0.5")


def _raw(tail: dict, batches: list[int], seconds: float) -> dict[int, tuple[int, list]]:
    """Per batch size: (intra-op threads, seconds per call) of the faster of 1 thread and ORT's
    default (0), by median."""
    out = _run_role("--role", "raw", "--onnx", tail["onnx"], "--shape", json.dumps(tail["shape"]),
                    "--batches", json.dumps(sorted(set(batches))), "--seconds", str(seconds),
                    "--threads", json.dumps([1, 0]),
                    *(["--optimized"] if tail["optimized"] else []))
    best: dict[int, tuple[int, list]] = {}
    for key, samples in out.items():
        threads, batch = (int(v) for v in key.split(":"))
        if batch not in best or stats(samples).median < stats(best[batch][1]).median:
            best[batch] = (threads, samples)
        if threads == 1:  # context: raw ORT at one thread, the worker's default setting
            best.setdefault(-batch, (1, samples))
    return best


def _threads(n: int) -> str:
    return "1 intra-op thread" if n == 1 else "ORT's default threads"


def _point(worker: _Worker, broker, tail: dict, c: int, seconds: float) -> dict:
    """One endpoint run at concurrency ``c``, then raw ORT at the batch size the worker ran
    (and batch 1) right after, so both sides see the same machine load."""
    before = worker.batches()
    cpu0 = _cpu_s(worker.proc.pid), _cpu_s(broker.pid)
    res = _client(broker.port, tail, c, seconds)
    cpu1 = _cpu_s(worker.proc.pid), _cpu_s(broker.pid)
    after = worker.batches()
    span = res["elapsed"] + 0.7  # whole-run CPU (warm-up included), in cores
    res["cpu"] = (f"CPU in cores: worker {(cpu1[0] - cpu0[0]) / span:.2f}, broker "
                  f"{(cpu1[1] - cpu0[1]) / span:.2f}, client {res['client_cpu_s'] / span:.2f} "
                  "(incl. start-up)")
    n_batches = after[1] - before[1]
    res["mean_batch"] = (after[0] - before[0]) / n_batches if n_batches else 1.0
    res["raw"] = _raw(tail, [1, max(1, round(res["mean_batch"]))], seconds / 2)
    return res


def run(quick: bool = False, worker_threads: int = ENDPOINT_THREADS
        ) -> tuple[list[Result], str]:
    from tests._support.broker import Mosquitto

    seconds = 1.5 if quick else 3.5
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tandem-bench-cloud-") as tmp_name:
        tmp = Path(tmp_name)
        tails = _prepare(tmp)
        broker = Mosquitto(tmp / "broker", extra_config="max_queued_messages 100000\n"
                           "max_inflight_messages 0")
        with broker:
            measured: dict[tuple[str, str, int], dict] = {}
            modes = (("on", ("--max-batch", str(MAX_BATCH_ON), "--max-delay-ms",
                             str(MAX_DELAY_MS))),
                     ("off", ("--max-batch", "1", "--max-delay-ms", "0")))
            again: dict[tuple[str, str], float] = {}  # a second c=32 run: on, off, on, off
            for tail_name, tail in tails.items():  # per tail: batching on, then off
                for rep in (1, 2):
                    for batching, opts in modes:
                        worker = _Worker(tmp, broker.port, f"bench-{tail_name}-{batching}{rep}",
                                         *opts, "--intra-op-threads", str(worker_threads))
                        try:
                            if rep == 1:
                                for c in CONCURRENCY:
                                    measured[(tail_name, batching, c)] = _point(
                                        worker, broker, tail, c, seconds)
                            else:
                                res = _client(broker.port, tail, 32, seconds)
                                again[(tail_name, batching)] = res["n"] / res["elapsed"]
                        finally:
                            worker.stop()
            for (tail_name, batching, c), res in measured.items():
                b = max(1, round(res["mean_batch"]))
                raw_threads, raw_samples = res["raw"][b]
                raw_s = stats(raw_samples)
                raw_thr = b / raw_s.median
                thr = res["n"] / res["elapsed"]
                lat = stats(res["latencies"]) if res["latencies"] else None
                target = "ratio >= 0.85" if c == 32 else None
                results.append(Result(
                    f"{tail_name}_{batching}_c{c}_throughput", thr, "req/s",
                    baseline=f"raw_ort_batch{b}", baseline_value=raw_thr, target=target,
                    met=(thr / raw_thr >= 0.85) if target else None,
                    p99=lat.p99 * 1000 if lat else None,
                    notes=f"p50 {lat.median * 1000:.3f} ms, p99 {lat.p99 * 1000:.3f} ms, "
                          f"mean batch {res['mean_batch']:.2f}, {res['n']} requests, "
                          f"{res['errors']} errors; raw batch {b}: "
                          f"{raw_s.median * 1000:.3f} ms/call ({_threads(raw_threads)}); raw "
                          f"at 1 thread: {b / stats(res['raw'][-b][1]).median:.0f} samples/s "
                          f"(ratio {thr * stats(res['raw'][-b][1]).median / b:.2f}); "
                          f"{res['cpu']}" if lat
                          else "no answers"))
            for tail_name in tails:
                on1 = stats(measured[(tail_name, "on", 1)]["latencies"])
                raw1 = stats(measured[(tail_name, "on", 1)]["raw"][1][1])
                bound = raw1.median * 1000 + MAX_DELAY_MS + 1.0
                results.append(Result(
                    f"{tail_name}_on_c1_p50", on1.median * 1000, "ms",
                    baseline="raw_ort_batch1_p50+max_delay+1ms", baseline_value=bound,
                    target="ratio <= 1.0", met=on1.median * 1000 <= bound,
                    p99=on1.p99 * 1000, min=on1.min * 1000, max=on1.max * 1000, n=on1.n,
                    notes=f"raw batch-1 p50 {raw1.median * 1000:.3f} ms, max delay "
                          f"{MAX_DELAY_MS} ms"))
                # two interleaved runs each (on, off, on, off), so a drift in the machine's
                # load between them does not decide the ratio
                on32 = measured[(tail_name, "on", 32)]
                off32 = measured[(tail_name, "off", 32)]
                runs_on = (on32["n"] / on32["elapsed"], again[(tail_name, "on")])
                runs_off = (off32["n"] / off32["elapsed"], again[(tail_name, "off")])
                thr_on, thr_off = sum(runs_on) / 2, sum(runs_off) / 2
                want = 1.3 if tail_name == "light" else 1.0
                results.append(Result(
                    f"{tail_name}_batching_gain_c32", thr_on, "req/s",
                    baseline="batching_off_c32", baseline_value=thr_off,
                    target=f"ratio >= {want}", met=thr_on / thr_off >= want,
                    notes="mean of two runs each, interleaved: on "
                          f"{runs_on[0]:.0f}, {runs_on[1]:.0f}; off {runs_off[0]:.0f}, "
                          f"{runs_off[1]:.0f} req/s"))
            # scale-out: one vs two workers, one intra-op thread each, on the heavy tail
            heavy = tails["heavy"]
            opts = ("--max-batch", str(MAX_BATCH_ON), "--max-delay-ms", str(MAX_DELAY_MS),
                    "--intra-op-threads", "1")
            thr = {}
            for n in (1, 2):
                workers = [_Worker(tmp, broker.port, f"scale{n}-{i}", *opts) for i in range(n)]
                try:
                    res = _client(broker.port, heavy, 32, seconds)
                    thr[n] = res["n"] / res["elapsed"]
                finally:
                    for w in workers:
                        w.stop()
            results.append(Result(
                "heavy_two_workers", thr[2], "req/s", baseline="one_worker", baseline_value=thr[1],
                target="ratio >= 1.6", met=thr[2] / thr[1] >= 1.6,
                notes="batching on, concurrency 32, --intra-op-threads 1 per worker"))
            version = subprocess.run([broker.binary, "-h"], capture_output=True,
                                     text=True).stdout.splitlines()[0]
    notes = (f"{os.cpu_count()} cores shared with other work; {version} on 127.0.0.1 "
             "(set_tcp_nodelay true); MQTT 5 QoS 1; worker, client, raw ORT and broker in "
             "separate processes; the client is raw paho keeping C requests in flight; worker "
             f"--intra-op-threads {worker_threads}, raw ORT the faster of 1 thread and its "
             "default; light tail = dynamic_batch cut 5 (input [1,8,1,1]), heavy tail = 3-conv "
             f"CNN {HEAVY_CHANNELS} channels on 16x32x32 (cut 0). CPU only, no GPU figure.")
    return results, notes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--role" in argv:
        p = argparse.ArgumentParser()
        p.add_argument("--role", choices=["raw", "client"])
        p.add_argument("--onnx")
        p.add_argument("--shape")
        p.add_argument("--batches")
        p.add_argument("--seconds", type=float, default=2.0)
        p.add_argument("--threads", default="[0]")
        p.add_argument("--optimized", action="store_true")
        p.add_argument("--port", type=int)
        p.add_argument("--tail")
        p.add_argument("--concurrency", type=int, default=1)
        p.add_argument("--warmup", type=float, default=0.5)
        args = p.parse_args(argv)
        (_role_raw if args.role == "raw" else _role_client)(args)
        return 0
    p = parser("Cloud endpoint vs raw ONNX Runtime")
    p.add_argument("--worker-threads", type=int, default=ENDPOINT_THREADS,
                   help=f"the worker's --intra-op-threads (0: ORT's default; default "
                        f"{ENDPOINT_THREADS})")
    args = p.parse_args(argv)
    results, notes = run(quick=args.quick, worker_threads=args.worker_threads)
    print_table("cloud endpoint (tandem cloud serve) vs raw ONNX Runtime, CPU", results)
    path = write_json("cloud", results, args.json_path, notes=notes)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
