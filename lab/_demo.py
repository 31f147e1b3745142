"""``tandem demo``: the whole system on one machine, in under a minute.

1. make the demo model (``tandem.compiler.examples.mobilenet``: a MobileNet-style classifier
   with **random** weights, whose cuts trade compute against bytes) and compile it;
2. start a broker (mosquitto when installed, else the embedded MQTT 3.1.1 broker), one cloud
   worker (``tandem cloud serve``) and one edge daemon (``tandem edge run``) behind the link
   emulator, the daemon held to a share of one CPU so that the "device" computes slower than
   the "cloud" (as a Jetson is slower than a cloud GPU);
3. under each emulated link, send requests through the daemon's local KServe v2 API with every
   plan forced (local, cloud, each split) and then with ``auto``;
4. print per link and plan the p50 and p99 seen by the application, the fastest forced plan,
   and the plan ``auto`` chose; stop everything it started, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tandem.lab._broker import EmbeddedBroker, SyncBroker
from tandem.lab._link import PROFILES, LinkEmulator, SyncLinkEmulator
from tandem.lab._procs import (
    MosquittoProcess,
    Processes,
    free_port,
    http_ok,
    mosquitto_binary,
)
from tandem.lab._throttle import CpuLimit
from tandem.protocol.errors import FailedPrecondition, InvalidArgument

__all__ = ["DemoOptions", "DemoResult", "PlanRow", "print_result", "run_demo"]

DEVICE_ID = "demo-cam"


@dataclass(frozen=True)
class DemoOptions:
    links: tuple[str, ...] = ("wired", "wifi", "3g")
    requests: int = 6  # per forced plan and link (auto gets twice as many)
    edge_cpu: float = 0.1  # the edge daemon's share of one CPU (1: not held back)
    broker: str = "auto"  # auto | mosquitto | embedded
    deadline_ms: float = 5000.0
    work_dir: Path | None = None  # kept when given; else a temporary directory, removed

    def __post_init__(self) -> None:
        classes = [p for p in PROFILES if p != "unlimited"]
        unknown = [n for n in self.links if n not in classes]
        if not self.links or unknown:
            raise InvalidArgument(f"links must be among {', '.join(classes)}, not "
                                  f"{', '.join(unknown) or 'none'}")
        if not 1 <= self.requests <= 1000:
            raise InvalidArgument(f"requests must be in [1, 1000], not {self.requests}")
        if not 0 < self.edge_cpu <= 1:
            raise InvalidArgument(f"the edge's CPU share is in (0, 1], not {self.edge_cpu}")
        if self.broker not in ("auto", "mosquitto", "embedded"):
            raise InvalidArgument(f"broker must be auto, mosquitto or embedded, not "
                                  f"{self.broker!r}")


@dataclass
class PlanRow:
    link: str
    plan: str  # local, cloud, split:<k>, or auto
    n: int
    p50_ms: float
    p99_ms: float
    ran: dict[str, int] = field(default_factory=dict)  # cloud / local / fallback
    chosen: dict[str, int] = field(default_factory=dict)  # auto only: plan -> count


@dataclass
class DemoResult:
    broker: str
    throttle: str
    edge_full_ms: float | None  # the daemon's estimate of the whole model on the "device"
    cloud_full_ms: float | None  # the worker's compute time for the whole model (cut 0)
    rows: list[PlanRow]
    cuts: list[int]
    seconds: float

    @property
    def speed_ratio(self) -> float | None:
        if self.edge_full_ms and self.cloud_full_ms:
            return self.edge_full_ms / self.cloud_full_ms
        return None

    def to_json(self) -> str:
        doc = asdict(self)
        doc["speed_ratio"] = self.speed_ratio
        return json.dumps(doc, indent=2)


def _terminate_as_interrupt(signum, frame):  # SIGTERM ends the demo like Ctrl-C: cleaned up
    raise KeyboardInterrupt


def run_demo(options: DemoOptions, say: Callable[[str], None]) -> DemoResult:
    """Run the demo, reporting progress through ``say``; everything started is stopped before
    this returns or raises."""
    from tandem.compiler import BundleFromOnnx, CompileOptions, examples
    from tandem.edge import Client
    from tandem.protocol.bundle import load_bundle

    t_start = time.monotonic()
    temporary = options.work_dir is None
    work: Path = Path(tempfile.mkdtemp(prefix="tandem-demo-")) if options.work_dir is None \
        else options.work_dir
    work.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt) \
        if _main_thread() else None
    procs = Processes()
    link: SyncLinkEmulator | None = None
    embedded: SyncBroker | None = None
    limit: CpuLimit | None = None
    try:
        say("compiling the demo model (a MobileNet-style classifier, random weights) ...")
        repo = work / "repo"
        repo.mkdir(exist_ok=True)
        model = examples.save(examples.mobilenet(), work / "mobilenet.onnx")
        BundleFromOnnx(model, repo / "mobilenet",
                       CompileOptions(targets=("onnxruntime",), overwrite=True))()
        with load_bundle(repo / "mobilenet") as bundle:
            manifest = bundle.manifest
            cuts = [c.id for c in manifest.cuts if not c.cloud_only and not c.local_only]
            input_spec = manifest.inputs[0]
        image = np.random.default_rng(0).standard_normal(
            [d if isinstance(d, int) else 1 for d in input_spec.shape]).astype(np.float32)

        binary = mosquitto_binary() if options.broker in ("auto", "mosquitto") else None
        if options.broker == "mosquitto" and binary is None:
            raise FailedPrecondition("mosquitto is not installed (apt-get install mosquitto), "
                                     "or use --broker embedded")
        env = {"TANDEM_LOG_LEVEL": "info"}
        if binary is not None:
            broker = procs.add(MosquittoProcess(binary, work))
            assert isinstance(broker, MosquittoProcess)
            port, broker_name = broker.port, broker.version()
        else:
            embedded = SyncBroker(EmbeddedBroker("127.0.0.1", 0)).start()
            port, broker_name = embedded.port, "the embedded MQTT 3.1.1 broker (tandem.lab)"
            env["TANDEM_MQTT_VERSION"] = "311"
        say(f"broker: {broker_name} on 127.0.0.1:{port}")

        worker = procs.tandem("cloud worker", [
            "cloud", "serve", "--repo", str(repo), "--broker", f"mqtt://127.0.0.1:{port}",
            "--worker-id", "demo-worker", "--intra-op-threads", "1"], work / "worker.log",
            env=env)

        link = SyncLinkEmulator(LinkEmulator("127.0.0.1", port, PROFILES[options.links[0]]))
        link.start()

        api_port = free_port()
        join = ""
        if options.edge_cpu < 1:
            limit = CpuLimit("edge", options.edge_cpu, join_dir=work)
            join = str(limit.join_file)
        edge_env = {**env, "TANDEM_PROFILE_RUNS": "5", "TANDEM_PROFILE_WARMUP": "1",
                    "TANDEM_INTRA_OP_THREADS": "1", "TANDEM_COMPUTE_THREADS": "1",
                    "TANDEM_ADVERTISE": "false", "TANDEM_INTERFACES": "127.0.0.1",
                    "TANDEM_PROBE_INTERVAL_S": "1"}
        edge = procs.add(_edge_process(work, repo / "mobilenet", link.port, api_port, join,
                                       edge_env))
        throttle = "none (the edge computes as fast as the cloud)"
        if limit is not None:
            limit.watch_join_file(60)
            throttle = limit.method
        say(f"cloud worker and edge daemon starting (edge held to {options.edge_cpu:.0%} of "
            f"one CPU: {throttle.split(' (')[0]}) ...")
        worker.wait_until(lambda: "serving $share" in worker.log.read_text(errors="replace"),
                          60, "subscription")
        url = f"http://127.0.0.1:{api_port}"
        edge.wait_until(lambda: http_ok(url + "/v2/health/ready"), 120, "ready API")

        rows: list[PlanRow] = []
        cloud_compute: list[float] = []
        plans = ["local", "cloud", *(f"split:{k}" for k in cuts)]
        with Client(url, timeout_s=options.deadline_ms / 1000 + 30) as client:
            edge_full_ms = _local_estimate(client.status())
            for name in options.links:
                profile = PROFILES[name]
                link.set_profile(profile)
                say(f"link {profile.describe()}: {len(plans)} plans x {options.requests} "
                    f"requests, then auto x {2 * options.requests} ...")
                for plan in plans:
                    lat, ran, _ = _drive(client, image, input_spec.name, plan, options,
                                         options.requests, cloud_compute)
                    rows.append(_row(name, plan, lat, ran))
                lat, ran, chosen = _drive(client, image, input_spec.name, "auto", options,
                                          2 * options.requests, cloud_compute)
                rows.append(_row(name, "auto", lat, ran, chosen))
        cloud_full_ms = statistics.median(cloud_compute) if cloud_compute else None
        return DemoResult(broker_name, throttle, edge_full_ms, cloud_full_ms, rows, cuts,
                          time.monotonic() - t_start)
    finally:
        procs.stop_all()
        for thing in (link, embedded, limit):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _edge_process(work: Path, bundle: Path, broker_port: int, api_port: int, join: str,
                  env: dict[str, str]):
    from tandem.lab._procs import Process

    args = ["edge", "run", "--bundle", str(bundle), "--device-id", DEVICE_ID, "--broker",
            f"mqtt://127.0.0.1:{broker_port}", "--api-port", str(api_port), "--state-dir",
            str(work / "edge-state")]
    return Process("edge daemon", [sys.executable, "-m", "tandem.lab._launch", join, "--",
                                   *args], work / "edge.log", env=env)


def _local_estimate(status: dict) -> float | None:
    for plan in status.get("plans", []):
        if plan.get("plan") == "local":
            return float(plan["expected_ms"])
    return None


def _drive(client, image: np.ndarray, input_name: str, mode: str, options: DemoOptions,
           n: int, cloud_compute: list[float]) -> tuple[list[float], Counter, Counter]:
    latencies: list[float] = []
    ran: Counter = Counter()
    chosen: Counter = Counter()
    for _ in range(n):
        t0 = time.perf_counter()
        result = client.infer({input_name: image}, mode=mode, deadline_ms=options.deadline_ms)
        latencies.append((time.perf_counter() - t0) * 1000)
        ran[str(result.ran)] += 1
        chosen[str(result.plan)] += 1
        p = result.parameters
        if result.plan == "cloud" and result.ran == "cloud" and p.get("cloud_compute_ms"):
            cloud_compute.append(float(p["cloud_compute_ms"]))
    return latencies, ran, chosen


def _row(link: str, plan: str, latencies: list[float], ran: Counter,
         chosen: Counter | None = None) -> PlanRow:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return PlanRow(link, plan, len(latencies), statistics.median(ordered), p99, dict(ran),
                   dict(chosen or {}))


def print_result(result: DemoResult, options: DemoOptions) -> None:
    """The table: per link, each forced plan's p50/p99 (the fastest marked), and auto's."""
    from tandem.console import Column, print_lines, print_table

    rows = []
    for name in options.links:
        mine = [r for r in result.rows if r.link == name]
        forced = [r for r in mine if r.plan != "auto"]
        best = min(forced, key=lambda r: r.p50_ms)
        for r in mine:
            if r.plan == "auto":
                top = sorted(r.chosen.items(), key=lambda kv: -kv[1])
                note = "auto chose " + ", ".join(f"{p} ({c}/{r.n})" for p, c in top)
            else:
                note = "fastest forced plan" if r is best else ""
                fell = r.ran.get("fallback", 0)
                if fell:
                    note = (note + "; " if note else "") + f"{fell} fell back to local"
            rows.append([name, r.plan, f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", str(r.n), note])
    print_table([Column("link"), Column("plan"), Column("p50 ms", justify="right"),
                 Column("p99 ms", justify="right"), Column("n", justify="right", fold=2),
                 Column("", fold=1)], rows,
                title="latency seen by the application, per link and plan")
    ratio = result.speed_ratio
    lines = [
        "",
        f"links: {'; '.join(PROFILES[n].describe() for n in options.links)}",
        f"broker: {result.broker}",
        f"edge held to {options.edge_cpu:.0%} of one CPU by {result.throttle}",
    ]
    if ratio is not None:
        lines.append(f"whole model: {result.edge_full_ms:.1f} ms on the edge, "
                     f"{result.cloud_full_ms:.1f} ms in the cloud worker ({ratio:.1f}x)")
    lines += [f"the model's weights are random: its answers mean nothing, its costs are real; "
              f"cuts {', '.join(map(str, result.cuts))} (tandem inspect shows them)",
              f"done in {result.seconds:.0f} s; everything started was stopped"]
    print_lines(*lines)

