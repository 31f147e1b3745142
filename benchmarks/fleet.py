"""A fleet against the cloud endpoint: 100 and 300 simulated devices, 1 and 2 workers.

Everything on 127.0.0.1, started and stopped here: one mosquitto (``set_tcp_nodelay true``),
the workers (``tandem cloud serve``, one shared-subscription group, one ONNX Runtime thread
each), and the fleet (``--role fleet``): one process holding N light devices, each its own MQTT
5 connection (client id ``dev-NNNN``) subscribed to its own reply topic, each sending at a set
rate (open loop: a device does not wait for its answers; the first send of each device at a
random phase) exactly what an edge daemon sends — an ``InferenceRequest`` with the reply topic,
correlation data and message expiry set as ``Transport.request`` sets them.

Credentials as in production: a fleet (``tandem.devices.fleet``, SQLite registry) enrolls every
device and worker, and mosquitto runs the fleet's password file and ACL (each device may publish
only its own requests and read only its own replies; each worker reads every request and
writes replies and its own load), on the fleet's plain-text password listener (loopback only,
so no TLS cost is measured). ``--no-auth`` runs anonymous instead.

Requests (realistic sizes, the demo model ``examples.mobilenet``): 90 % are split at its
bottleneck (cut 15: an 8x20x20 float32 frontier, 12.8 KB up, the heavy tail in the cloud), 10 %
are cloud-only (cut 0: the 3x160x160 input, 307 KB up); every answer carries 1,000 logits (4 KB).
Budget 2 s per request.

Each device counts every answer it receives by request id, so:

* **lost**: requests with no answer at all (a result or a typed error) by the end of the run
  (every send stops, then the fleet waits the budget plus 5 s). Target 0.
* **duplicated**: requests answered more than once. Target 0.
* throughput: successful answers per second (requests sent in the measured window); p50/p99
  of their latency, from the device's publish to its receipt of the answer; errors by code
  (a worker that cannot keep up answers DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED — answers, not
  losses);
* scaling: throughput with 2 workers over 1, at each fleet size (no target in the issue; the
  CPU time each worker got is reported beside it, since the machine is shared).

    python -m benchmarks.fleet [--quick] [--json PATH] [--rate R] [--devices 100,300] [--no-auth]

Writes the JSON and ``fleet.png`` (throughput and latency against devices, per worker count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import Result, parser, print_table, stats, write_json

ROOT = Path(__file__).resolve().parents[1]
BUDGET_MS = 2000
CLOUD_ONLY_SHARE = 0.10


# -- the fleet (its own process) -----------------------------------------------------------------


def _role_fleet(args: argparse.Namespace) -> dict:
    """Run ``args.devices`` devices; return what was sent and what came back."""
    from tandem.protocol import (
        InferenceRequest,
        MqttTransport,
        Tensor,
        TransportConfig,
        encode,
        new_request_id,
    )
    from tandem.protocol.codec import MessageType, decode, peek
    from tandem.protocol.transport import PublishProperties, expiry_for_budget

    spec = json.loads(args.spec)
    passwords = json.loads(Path(spec["credentials"]).read_text()) if spec.get("credentials") \
        else {}
    rng = np.random.default_rng(0)
    kinds = []
    for kind in spec["kinds"]:
        x = rng.standard_normal(kind["shape"]).astype(np.float32)
        kinds.append((kind, (Tensor.from_array(kind["input"], x),)))
    sent: dict[bytes, tuple[float, int]] = {}  # id -> (send time, kind index)
    answers: dict[bytes, list[tuple[float, int]]] = {}  # id -> [(receive time, error code)]
    unknown = 0

    refused: dict[bytes, str] = {}  # id -> why the broker refused the PUBLISH (its PUBACK)

    async def main() -> dict:
        nonlocal unknown
        devices: list[MqttTransport | None] = [None] * args.devices
        acks: list[asyncio.Task] = []

        def on_answer(msg) -> None:
            nonlocal unknown
            now = time.monotonic()
            info = peek(msg.payload)
            if info.type is not MessageType.INFERENCE_RESPONSE or info.id not in sent:
                unknown += 1
                return
            response = decode(msg.payload)
            code = int(response.error.code) if response.error is not None else 0
            answers.setdefault(info.id, []).append((now, code))

        async def connect(i: int) -> None:
            name = f"dev-{i:04d}"
            t = MqttTransport(TransportConfig(
                port=args.port, client_id=name, clean_start=True,
                username=name if name in passwords else None, password=passwords.get(name)))
            await t.connect()
            await t.subscribe(f"tandem/v1/resp/dev-{i:04d}", on_answer)
            devices[i] = t

        t_connect = time.monotonic()
        for first in range(0, args.devices, 50):  # 50 handshakes at a time
            await asyncio.gather(*(connect(i) for i in range(first,
                                                             min(args.devices, first + 50))))
        connect_s = time.monotonic() - t_connect
        start = time.monotonic() + 0.5
        window = (start + args.warmup, start + args.warmup + args.seconds)
        period = 1.0 / args.rate
        picker = random.Random(1)

        async def device(t: MqttTransport, i: int) -> None:
            device_id = f"dev-{i:04d}"
            reply = f"tandem/v1/resp/{device_id}"
            at = start + picker.uniform(0, period)
            while at < window[1]:
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                k = 1 if picker.random() < spec["cloud_only_share"] else 0
                kind, tensors = kinds[k]
                request = InferenceRequest(
                    id=new_request_id(), device_id=device_id, model_digest=spec["digest"],
                    cut_id=kind["cut"], budget_ms=BUDGET_MS, tensors=tensors,
                    reply_topic=reply)
                props = PublishProperties(response_topic=reply, correlation_data=request.id,
                                          message_expiry_s=expiry_for_budget(BUDGET_MS))
                sent[request.id] = (time.monotonic(), k)
                try:
                    handle = await t.publish(f"tandem/v1/req/{device_id}/{spec['model']}",
                                             encode(request), properties=props)
                except Exception:  # not connected: the request never left, it is not counted
                    del sent[request.id]
                else:
                    acks.append(asyncio.ensure_future(acked(handle, request.id)))
                at += period

        async def acked(handle, rid: bytes) -> None:
            try:
                await handle
            except Exception as exc:  # e.g. MQTT 5 PUBACK 0x87: not authorized
                refused[rid] = f"{type(exc).__name__}: {exc}"

        await asyncio.gather(*(device(t, i) for i, t in enumerate(devices)))
        await asyncio.gather(*acks)
        # every send is done: wait for the answers (budget + 5 s at most), then a while more
        # for duplicates
        deadline = time.monotonic() + args.drain_s
        while time.monotonic() < deadline and len(answers) < len(sent):
            await asyncio.sleep(0.05)
        await asyncio.sleep(min(1.0, args.drain_s))
        await asyncio.gather(*(t.close() for t in devices if t is not None))
        return {"window": window, "connect_s": connect_s}

    meta = asyncio.run(main())
    lo, hi = meta["window"]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ok_in_window = 0
    by_kind = {0: [], 1: []}
    from tandem.protocol.errors import Code

    for rid, (t_send, k) in sent.items():
        got = answers.get(rid)
        if not got:
            continue
        t_recv, code = got[0]
        if code:
            name = Code(code).name if code in Code._value2member_map_ else str(code)
            errors[name] = errors.get(name, 0) + 1
        elif lo <= t_send < hi:
            ok_in_window += 1
            latencies.append(t_recv - t_send)
            by_kind[k].append(t_recv - t_send)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "sent": len(sent),
        "sent_in_window": sum(1 for t, _ in sent.values() if lo <= t < hi),
        "answered": len(answers),
        "lost": sum(1 for rid in sent if rid not in answers),
        "duplicated": sum(1 for got in answers.values() if len(got) > 1),
        "unknown_answers": unknown,
        "refused_by_broker": len(refused),
        "refusals": sorted(set(refused.values()))[:5],
        "ok_in_window": ok_in_window,
        "window_s": hi - lo,
        "latencies": latencies,
        "latencies_split": by_kind[0],
        "latencies_cloud_only": by_kind[1],
        "errors": errors,
        "connect_s": meta["connect_s"],
        "fleet_cpu_s": ru.ru_utime + ru.ru_stime,
    }


# -- the run -------------------------------------------------------------------------------------


def _prepare(tmp: Path) -> dict:
    """Compile the demo model into tmp/repo; the spec of the two request kinds."""
    from tandem.compiler import BundleFromOnnx, CompileOptions, examples
    from tandem.protocol.bundle import load_bundle

    repo = tmp / "repo"
    repo.mkdir()
    path = examples.save(examples.mobilenet(), tmp / "mobilenet.onnx")
    BundleFromOnnx(path, repo / "mobilenet", CompileOptions(targets=("onnxruntime",)))()
    with load_bundle(repo / "mobilenet") as b:
        m = b.manifest
        total = m.cuts[0].tail_flops
        interior = [c for c in m.cuts if not c.cloud_only and not c.local_only
                    and c.head_flops <= 0.1 * total]
        bottleneck = min(interior, key=lambda c: c.frontier_bytes)
        kinds = []
        for cut in (bottleneck, m.cuts[0]):
            (tensor,) = cut.frontier
            kinds.append({"cut": cut.id, "input": tensor.name,
                          "shape": [d if isinstance(d, int) else 1 for d in tensor.shape],
                          "bytes": cut.frontier_bytes})
        return {"digest": m.source_digest, "model": "mobilenet", "kinds": kinds,
                "cloud_only_share": CLOUD_ONLY_SHARE}


def _credentials(tmp: Path, devices: int, workers: int) -> tuple[int, Path, dict[str, str], str]:
    """A fleet with ``devices`` devices and ``workers`` workers: (its plain listener's port, the
    mosquitto config snippet's directory, the workers' passwords, a file of the devices')."""
    from tandem.devices.fleet import Fleet, load_enrollment
    from tests._support.broker import free_port

    ports = []
    while len(ports) < 3:
        port = free_port()
        if port not in ports:
            ports.append(port)
    fleet, _ = Fleet.init(tmp / "fleet", name="bench", bind="127.0.0.1",
                          broker_hosts=("127.0.0.1",), tls_port=ports[0],
                          password_port=ports[1], plain_port=ports[2])
    for i in range(devices):
        fleet.add_device(f"dev-{i:04d}", profile="cpu-x86_64")
    for i in range(workers):
        fleet.add_worker(f"worker-{i}")
    enroll = fleet.layout.enroll_dir
    device_pw = {f"dev-{i:04d}": load_enrollment(enroll / f"dev-{i:04d}.toml").password
                 for i in range(devices)}
    worker_pw = {f"worker-{i}": load_enrollment(enroll / f"worker-{i}.toml").password
                 for i in range(workers)}
    path = tmp / "device-passwords.json"
    path.write_text(json.dumps(device_pw))
    path.chmod(0o600)
    return ports[2], fleet.layout.broker_conf.parent, worker_pw, str(path)


def _fleet(port: int, spec: dict, devices: int, rate: float, seconds: float,
           warmup: float) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet", "--role", "fleet", "--port", str(port),
         "--spec", json.dumps(spec), "--devices", str(devices), "--rate", str(rate),
         "--seconds", str(seconds), "--warmup", str(warmup)],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + warmup + 180)
    if proc.returncode != 0:
        raise RuntimeError(f"the fleet failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, rate: float = 0.5, fleet_sizes: tuple[int, ...] = (100, 300),
        auth: bool = True) -> tuple[list[Result], str, dict]:
    from benchmarks.cloud import _cpu_s, _Worker
    from tests._support.broker import Mosquitto

    seconds, warmup = (6.0, 2.0) if quick else (20.0, 3.0)
    measured: dict[tuple[int, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        spec = _prepare(tmp)
        extra = "max_queued_messages 100000\nmax_inflight_messages 0"
        worker_pw: dict[str, str] = {}
        if auth:
            port, conf_dir, worker_pw, spec["credentials"] = _credentials(
                tmp, max(fleet_sizes), 2)
            extra += f"\ninclude_dir {conf_dir}"
        broker = Mosquitto(tmp / "broker", extra_config=extra)
        with broker:
            port = port if auth else broker.port
            version = subprocess.run([broker.binary, "-h"], capture_output=True,
                                     text=True).stdout.splitlines()[0]
            for workers in (1, 2):
                procs = []
                for i in range(workers):
                    name = f"worker-{i}" if auth else f"fleet{workers}-{i}"
                    procs.append(_Worker(tmp, port, name, "--group", "fleet",
                                         "--max-batch", "8", "--max-delay-ms", "2",
                                         "--intra-op-threads", "1",
                                         env={"TANDEM_USERNAME": name,
                                              "TANDEM_PASSWORD": worker_pw[name]}
                                         if auth else None))
                try:
                    for devices in fleet_sizes:
                        cpu0 = [_cpu_s(w.proc.pid) for w in procs]
                        t0 = time.monotonic()
                        res = _fleet(port, spec, devices, rate, seconds, warmup)
                        span = time.monotonic() - t0
                        res["worker_cores"] = [(_cpu_s(w.proc.pid) - c) / span
                                               for w, c in zip(procs, cpu0, strict=True)]
                        measured[(devices, workers)] = res
                finally:
                    for w in procs:
                        w.stop()
    results: list[Result] = []
    plot: dict = {"rate": rate, "rows": []}
    for (devices, workers), res in sorted(measured.items()):
        offered = devices * rate
        thr = res["ok_in_window"] / res["window_s"]
        lat = stats(res["latencies"]) if res["latencies"] else None
        name = f"d{devices}_w{workers}"
        split = stats(res["latencies_split"]) if res["latencies_split"] else None
        cloud = stats(res["latencies_cloud_only"]) if res["latencies_cloud_only"] else None
        cores = ", ".join(f"{c:.2f}" for c in res["worker_cores"])
        results.append(Result(
            f"{name}_throughput", thr, "answers/s", baseline="offered", baseline_value=offered,
            notes=f"{res['sent']} sent ({res['sent_in_window']} in the {res['window_s']:.0f} s "
                  f"window), {res['answered']} answered; errors by code {res['errors']}; "
                  f"worker CPU in cores: {cores}; fleet CPU {res['fleet_cpu_s']:.1f} s; "
                  f"{devices} connections in {res['connect_s']:.1f} s"))
        if lat is not None:
            results.append(Result(
                f"{name}_latency_p50", lat.median * 1e3, "ms", p99=lat.p99 * 1e3,
                min=lat.min * 1e3, max=lat.max * 1e3, n=lat.n,
                notes=(f"split (12.8 KB) p50 {split.median * 1e3:.1f} / p99 "
                       f"{split.p99 * 1e3:.1f} ms" if split else "") +
                      (f"; cloud-only (307 KB) p50 {cloud.median * 1e3:.1f} / p99 "
                       f"{cloud.p99 * 1e3:.1f} ms" if cloud else "")))
        results.append(Result(f"{name}_lost", res["lost"], "requests", target="== 0",
                              met=res["lost"] == 0,
                              notes=f"of {res['sent']} sent; {res['refused_by_broker']} refused "
                                    f"by the broker {res['refusals'] or ''}".rstrip()))
        results.append(Result(f"{name}_duplicated", res["duplicated"], "requests",
                              target="== 0", met=res["duplicated"] == 0,
                              notes=f"answers for unknown ids: {res['unknown_answers']}"))
        plot["rows"].append({"devices": devices, "workers": workers, "offered": offered,
                             "throughput": thr, "p50": lat.median * 1e3 if lat else None,
                             "p99": lat.p99 * 1e3 if lat else None})
    for devices in fleet_sizes:
        one, two = measured[(devices, 1)], measured[(devices, 2)]
        t1 = one["ok_in_window"] / one["window_s"]
        t2 = two["ok_in_window"] / two["window_s"]
        c1, c2 = sum(one["worker_cores"]), sum(two["worker_cores"])
        results.append(Result(
            f"d{devices}_scaling_1to2_workers", t2, "answers/s", baseline="one_worker",
            baseline_value=t1,
            notes=f"offered {devices * rate:.0f}/s; the workers got {c1:.2f} cores (1 worker) "
                  f"and {c2:.2f} cores (2 workers) of the shared machine"))
        if c1 > 0 and c2 > 0:  # what each core of worker time delivered: the scaling's quality
            results.append(Result(
                f"d{devices}_answers_per_worker_core_1to2", t2 / c2, "answers/s/core",
                baseline="one_worker", baseline_value=t1 / c1,
                notes="successful answers per second per core of worker CPU time: a ratio "
                      "near 1 means a second worker adds what the CPU it gets allows"))
    creds = ("every device and worker with its own password and ACL from a tandem fleet "
             "(plain-text listener on loopback)" if auth else "anonymous")
    notes = (f"{os.cpu_count()} cores shared with other work (indicative figures); {version} on "
             f"127.0.0.1 (set_tcp_nodelay true), {creds}; MQTT 5 QoS 1; devices at {rate:g} "
             "request/s "
             f"each (open loop), 90 % split at the demo model's bottleneck (12.8 KB), 10 % "
             f"cloud-only (307 KB), budget {BUDGET_MS} ms; workers: max batch 8, max delay "
             "2 ms, 1 ONNX Runtime thread; fleet, workers and broker in separate processes. "
             "CPU only, no GPU figure.")
    return results, notes, plot


def _plot(plot: dict, path: Path, notes: str) -> Path:
    from benchmarks._plots import lines

    rows = plot["rows"]
    series, lat, p99 = {}, {}, {}
    for workers in sorted({r["workers"] for r in rows}):
        mine = [r for r in rows if r["workers"] == workers]
        label = f"{workers} worker{'s' if workers > 1 else ''}"
        series[label] = ([r["devices"] for r in mine], [r["throughput"] for r in mine])
        done = [r for r in mine if r["p50"] is not None]
        lat[label] = ([r["devices"] for r in done], [r["p50"] for r in done])
        p99[label] = [r["p99"] for r in done]
    offered = sorted({(r["devices"], r["offered"]) for r in rows})
    series["offered"] = ([d for d, _ in offered], [o for _, o in offered])
    return lines(path, series, title="successful answers per second", xlabel="devices",
                 ylabel="answers/s", reference=("offered",),
                 panels=[{"series": lat, "errors": p99, "title": "latency p50 (whisker: p99)",
                          "xlabel": "devices", "ylabel": "ms", "log_y": True}],
                 footnote=notes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--role" in argv:
        p = argparse.ArgumentParser()
        p.add_argument("--role", choices=["fleet"])
        p.add_argument("--port", type=int)
        p.add_argument("--spec")
        p.add_argument("--devices", type=int)
        p.add_argument("--rate", type=float)
        p.add_argument("--seconds", type=float)
        p.add_argument("--warmup", type=float)
        p.add_argument("--drain-s", type=float, default=BUDGET_MS / 1000 + 5)
        args = p.parse_args(argv)
        print(json.dumps(_role_fleet(args)))
        return 0
    p = parser("A fleet of simulated devices against 1 and 2 cloud workers")
    p.add_argument("--rate", type=float, default=0.5,
                   help="requests per second per device (default 0.5)")
    p.add_argument("--devices", default="100,300", help="fleet sizes (default 100,300)")
    p.add_argument("--no-auth", action="store_true",
                   help="anonymous clients instead of a fleet's credentials and ACLs")
    args = p.parse_args(argv)
    sizes = tuple(int(n) for n in args.devices.split(","))
    if not args.rate > 0 or not sizes or min(sizes) < 1 or max(sizes) > 2000:
        p.error("--rate must be > 0 and --devices between 1 and 2000")
    results, notes, plot = run(quick=args.quick, rate=args.rate, fleet_sizes=sizes,
                               auth=not args.no_auth)
    print_table("fleet: simulated devices against tandem cloud serve", results)
    path = write_json("fleet", results, args.json_path, notes=notes)
    png = _plot(plot, path.with_suffix(".png"), notes)
    print(f"results: {path}\nfigure: {png}")
    failed = [r.metric for r in results if r.met is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
