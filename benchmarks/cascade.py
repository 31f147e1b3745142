"""Cascades (issue #17): a small model answers on the device, the large one in the cloud takes the
inputs its escalation rule sends on. Accuracy, escalation rate and latency on every link class,
through the whole system.

Data and models (:mod:`benchmarks._cascade_models`): scikit-learn's handwritten digits (1,797
8x8 images shipped inside the package; nothing is downloaded), split with a seeded permutation
into 900 training rows, 450 calibration rows and 447 held-out test rows. Both models are trained
here, when the benchmark runs, on the training rows: the *small* one a
``LogisticRegression(C=0.05)`` (650 parameters), the *large* one an ``MLPClassifier((256, 256))``
(ReLU, about 85,000 parameters); each is written as an ONNX graph with ``onnx.helper`` from its
fitted weights (a chain of Gemm and Relu, checked against scikit-learn's ``predict_proba``).

The cascade bundle is compiled as a user would (``tandem compile large.onnx --cascade
small.onnx -t onnxruntime --samples calibration.npz --labels calibration_labels.npy
--agreement 0.99``, here :class:`tandem.compiler.CascadeBundleFromOnnx`): max-softmax rule,
threshold calibrated label-free for 99 % agreement with the large model on the calibration rows.

The system, as ``tandem demo`` runs it (``lab/_demo.py``): a real mosquitto, one ``tandem cloud
serve`` worker serving the bundle's large model, one ``tandem edge run`` daemon connected to the
broker through the link emulator (``tandem.lab.LinkEmulator``, set to each link class of the
split benchmark in turn: 3g 1 Mbit/s + 100 ms RTT, lte 6 Mbit/s + 50 ms, wifi 20 Mbit/s + 10 ms,
wired 100 Mbit/s + 2 ms, with their jitter), each its own process, everything on 127.0.0.1. The
device is not held back: both models are tiny, the link dominates.

Per link, every test row is sent once as ``mode=cloud`` (large-only: the raw input to the
cloud worker) and once as ``mode=cascade``, interleaved (cloud, cascade, cascade, cloud, ...),
one row per request through the daemon's KServe v2 API (binary tensors, ``tandem.edge.Client``),
timed from the caller. Small-only accuracy is the small model's own on the test rows (ONNX
Runtime in this process); its latency is the cascade's requests the small model answered.

Figures per link: accuracy of large-only and of the cascade, their ratio (target >= 0.99), the
share of inputs escalated (target <= 0.30), p50 / p99 / mean latency of the cascade against
cloud-only (target: ratio < 1 for p50 and mean). Plus the curve: escalation rate against
accuracy (and agreement) over the calibrated thresholds, on the calibration rows (the
manifest's curve) and on the test rows, with the measured operating points.

    python -m benchmarks.cascade [--quick] [--links 3g,lte,wifi,wired] [--json PATH]

Writes the JSON and ``cascade.png`` beside it. A full run takes about two minutes.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import Result, parser, print_table, stats, write_json

LINKS = ("3g", "lte", "wifi", "wired")
DEADLINE_MS = 5000.0
DEVICE_ID = "bench-cam"


def _onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixels": x})[0]


def _compile(paths: dict[str, Path], out: Path):
    from tandem.compiler import CascadeBundleFromOnnx, CascadeOptions, CompileOptions
    from tandem.protocol.bundle import load_bundle

    CascadeBundleFromOnnx(paths["small"], paths["large"], out,
                          CompileOptions(samples=paths["calibration"], targets=("onnxruntime",),
                                         overwrite=True),
                          CascadeOptions(agreement=0.99, labels=paths["calibration_labels"]))()
    with load_bundle(out) as b:
        return b.manifest.cascade


def _test_curve(cascade, small: np.ndarray, large: np.ndarray, y: np.ndarray):
    """(escalation rate, accuracy) on the test rows at each threshold of the manifest's curve."""
    out = []
    for point in cascade.calibration.curve:
        rule = dataclasses.replace(cascade.rule, threshold=point.threshold)
        esc = rule.escalates(rule.scores({cascade.rule.output: small}))
        pred = np.where(esc, large.argmax(1), small.argmax(1))
        out.append((float(esc.mean()), float((pred == y).mean())))
    return out


class _System:
    """mosquitto, a cloud worker, the link emulator and an edge daemon behind it."""

    def __init__(self, work: Path, repo: Path, bundle: Path, first_link: str) -> None:
        from tandem.lab import PROFILES, LinkEmulator, SyncLinkEmulator
        from tandem.lab._procs import MosquittoProcess, Processes, free_port, mosquitto_binary
        from tandem.protocol.errors import FailedPrecondition

        self.procs = Processes()
        self.link = None
        try:
            binary = mosquitto_binary()
            if binary is None:
                raise FailedPrecondition("mosquitto is not installed (apt-get install "
                                         "mosquitto): the benchmark runs a real broker")
            broker = self.procs.add(MosquittoProcess(binary, work))
            self.broker_version = broker.version()  # type: ignore[attr-defined]
            port = broker.port  # type: ignore[attr-defined]
            env = {"TANDEM_LOG_LEVEL": "info", "TANDEM_CONFIG": ""}
            worker = self.procs.tandem("cloud worker", [
                "cloud", "serve", "--repo", str(repo), "--broker", f"mqtt://127.0.0.1:{port}",
                "--worker-id", "bench-worker", "--intra-op-threads", "1"], work / "worker.log",
                env=env)
            self.link = SyncLinkEmulator(LinkEmulator("127.0.0.1", port, PROFILES[first_link]))
            self.link.start()
            self.api_port = free_port()
            edge_env = {**env, "TANDEM_PROFILE_RUNS": "20", "TANDEM_PROFILE_WARMUP": "3",
                        "TANDEM_INTRA_OP_THREADS": "1", "TANDEM_COMPUTE_THREADS": "1",
                        "TANDEM_ADVERTISE": "false", "TANDEM_INTERFACES": "127.0.0.1",
                        "TANDEM_PROBE_INTERVAL_S": "0.5", "TANDEM_PROFILE": "cpu-x86_64"}
            self.edge = self.procs.tandem("edge daemon", [
                "edge", "run", "--bundle", str(bundle), "--device-id", DEVICE_ID, "--broker",
                f"mqtt://127.0.0.1:{self.link.port}", "--api-port", str(self.api_port),
                "--state-dir", str(work / "edge-state")], work / "edge.log", env=edge_env)
            worker.wait_until(lambda: "serving $share" in worker.log.read_text(errors="replace"),
                              60, "subscription")
            from tandem.lab._procs import http_ok

            url = self.url
            self.edge.wait_until(lambda: http_ok(url + "/v2/health/ready"), 120, "ready API")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def close(self) -> None:
        self.procs.stop_all()
        if self.link is not None:
            self.link.close()


def _wait_available(client, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not client.status()["link"]["available"]:
        if time.monotonic() > end:
            raise RuntimeError("the edge daemon never reached the cloud")
        time.sleep(0.1)


def _run_link(client, x: np.ndarray) -> dict:
    """Every row once per mode, interleaved; latency from the caller, answers, parameters."""
    out: dict = {m: {"ms": [], "pred": [], "params": []} for m in ("cloud", "cascade")}
    for i in range(len(x)):
        order = ("cloud", "cascade") if i % 2 == 0 else ("cascade", "cloud")
        for mode in order:
            t0 = time.perf_counter()
            r = client.infer({"pixels": x[i:i + 1]}, mode=mode, deadline_ms=DEADLINE_MS)
            out[mode]["ms"].append((time.perf_counter() - t0) * 1e3)
            out[mode]["pred"].append(int(np.asarray(r.outputs["logits"]).argmax()))
            out[mode]["params"].append(r.parameters)
    return out


def _plot(path: Path, cascade, test_curve, large_offline: float, measured: dict, links,
          footnote: str) -> Path:
    from benchmarks._plots import lines
    from tandem.lab import PROFILES

    cal = cascade.calibration
    large_cal = cal.large_accuracy or 1.0
    series = {
        "calibration rows: agreement": ([p.escalation_rate for p in cal.curve],
                                        [p.agreement for p in cal.curve]),
        "calibration rows: accuracy / large": (
            [p.escalation_rate for p in cal.curve],
            [(p.accuracy or 0.0) / large_cal for p in cal.curve]),
        "test rows: accuracy / large (offline)": ([r for r, _ in test_curve],
                                                  [a / large_offline for _, a in test_curve]),
        "measured through the system (each link)": ([m["esc_rate"] for m in measured.values()],
                                 [m["acc_ratio"] for m in measured.values()]),
        "target 99 %": ([0.0, 1.0], [0.99, 0.99]),
    }
    rates = [PROFILES[n].uplink_bps / 1e6 for n in links]
    latency = {
        "cloud-only p50": (rates, [measured[n]["cloud"].median for n in links]),
        "cascade p50": (rates, [measured[n]["cascade"].median for n in links]),
        "small model answered p50": (rates, [measured[n]["small_path"].median
                                            for n in links]),
    }
    errors = {"cloud-only p50": [measured[n]["cloud"].p99 for n in links],
              "cascade p50": [measured[n]["cascade"].p99 for n in links]}
    return lines(path, series, title="digits cascade: escalation against accuracy",
                 xlabel="share of inputs escalated", ylabel="accuracy / large model's (or "
                 "agreement)", reference=("target 99 %",), footnote=footnote,
                 panels=[dict(series=latency, errors=errors, log_x=True, log_y=True,
                              title="latency per link class (whiskers: p99)",
                              xlabel="link rate, Mbit/s (3g, lte, wifi, wired)",
                              ylabel="ms, from the caller")])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--links", default=",".join(LINKS),
                   help=f"link classes, comma-separated (default {','.join(LINKS)})")
    args = p.parse_args(argv)
    links = [n.strip() for n in args.links.split(",") if n.strip()]
    unknown = [n for n in links if n not in LINKS]
    if not links or unknown:
        p.error(f"--links must be among {', '.join(LINKS)}")
    from benchmarks import _cascade_models as data
    from tandem.edge import Client
    from tandem.lab import PROFILES

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tandem-bench-cascade-"))
    system = None
    try:
        print("training the small and large models on the digits ...", flush=True)
        paths = data.write(work / "data")
        repo = work / "repo"
        repo.mkdir()
        print("compiling the cascade bundle (calibrating for 99 % agreement) ...", flush=True)
        cascade = _compile(paths, repo / "digits")
        x = np.load(paths["test"])["pixels"]
        y = np.load(paths["test_labels"])
        if args.quick:
            x, y = x[:60], y[:60]
        small_logits = _onnx_logits(paths["small"], x)
        large_logits = _onnx_logits(paths["large"], x)
        small_acc = float((small_logits.argmax(1) == y).mean())
        large_offline = float((large_logits.argmax(1) == y).mean())
        test_curve = _test_curve(cascade, small_logits, large_logits, y)

        print("starting mosquitto, a cloud worker and an edge daemon ...", flush=True)
        system = _System(work, repo, repo / "digits", links[0])
        measured: dict = {}
        with Client(system.url, timeout_s=DEADLINE_MS / 1000 + 30) as client:
            for name in links:
                profile = PROFILES[name]
                system.link.set_profile(profile)
                print(f"link {profile.describe()}: {len(x)} rows x (cloud, cascade) ...",
                      flush=True)
                _wait_available(client)
                for i in range(8):  # warm-up: the daemon measures the link again
                    client.infer({"pixels": x[i:i + 1]}, mode="cloud", deadline_ms=DEADLINE_MS)
                time.sleep(1.0)
                got = _run_link(client, x)
                cloud_pred = np.array(got["cloud"]["pred"])
                casc_pred = np.array(got["cascade"]["pred"])
                params = got["cascade"]["params"]
                escalated = np.array([bool(q.get("escalated")) for q in params])
                ran = [q.get("ran") for q in params]
                small_ms = [ms for ms, q in zip(got["cascade"]["ms"], params, strict=True)
                            if q.get("ran") == "local"]
                esc_ms = [ms for ms, q in zip(got["cascade"]["ms"], params, strict=True)
                          if q.get("ran") == "cloud"]
                large_acc = float((cloud_pred == y).mean())
                casc_acc = float((casc_pred == y).mean())
                measured[name] = {
                    "large_acc": large_acc, "cascade_acc": casc_acc,
                    "acc_ratio": casc_acc / large_acc if large_acc else 0.0,
                    "esc_rate": float(escalated.mean()),
                    "cloud": stats(got["cloud"]["ms"]), "cascade": stats(got["cascade"]["ms"]),
                    "cloud_mean": statistics.fmean(got["cloud"]["ms"]),
                    "cascade_mean": statistics.fmean(got["cascade"]["ms"]),
                    "small_path": stats(small_ms or [0.0]),
                    "escalated_path": stats(esc_ms or [0.0]),
                    "ran": {k: ran.count(k) for k in sorted(set(map(str, ran)))},
                    "plans": sorted({str(q.get("plan")) for q in params}),
                    "cloud_ran": sorted({str(q.get("ran")) for q in got["cloud"]["params"]}),
                    "encodings": {
                        "cloud": sorted({str(q.get("encoding")) for q in got["cloud"]["params"]}),
                        "escalations": sorted({str(q.get("encoding")) for q in params
                                               if q.get("ran") == "cloud"})},
                }
            status = client.status()
    finally:
        if system is not None:
            system.close()
    broker = system.broker_version if system is not None else "mosquitto"
    shutil.rmtree(work, ignore_errors=True)

    results: list[Result] = []
    cal = cascade.calibration
    results.append(Result("small_only_accuracy", small_acc, "fraction",
                          baseline="large_model_accuracy_offline",
                          baseline_value=large_offline, n=len(y),
                          notes="ONNX Runtime in the benchmark process, test rows"))
    results.append(Result("calibrated_escalation_rate", cal.chosen.escalation_rate, "fraction",
                          n=cal.samples, notes=f"threshold {cascade.rule.threshold:.4f} "
                          f"(max_softmax) for agreement >= 0.99 on the calibration rows: "
                          f"agreement {cal.chosen.agreement:.4f}"))
    for name in links:
        m = measured[name]
        c, k = m["cloud"], m["cascade"]
        results += [
            Result(f"{name}_cascade_accuracy", m["cascade_acc"], "fraction",
                   baseline=f"{name}_large_only_accuracy", baseline_value=m["large_acc"],
                   target="ratio >= 0.99", met=m["acc_ratio"] >= 0.99, n=len(y),
                   notes=f"frontier encodings: cloud-only {m['encodings']['cloud']}, "
                   f"escalations {m['encodings']['escalations']} (the planner's cheapest "
                   f"verified one); the large model offline, raw: {large_offline:.4f}"),
            Result(f"{name}_escalation_rate", m["esc_rate"], "fraction", target="<= 0.30",
                   met=m["esc_rate"] <= 0.30, n=len(y),
                   notes=f"ran {m['ran']}; plans {', '.join(m['plans'])}"),
            Result(f"{name}_cascade_p50", k.median, "ms", baseline=f"{name}_cloud_only_p50",
                   baseline_value=c.median, target="ratio < 1", met=k.median < c.median,
                   p99=k.p99, min=k.min, max=k.max, n=k.n,
                   notes=f"cloud-only p99 {c.p99:.2f} ms"),
            Result(f"{name}_cascade_mean", m["cascade_mean"], "ms",
                   baseline=f"{name}_cloud_only_mean", baseline_value=m["cloud_mean"],
                   target="ratio < 1", met=m["cascade_mean"] < m["cloud_mean"], n=k.n),
            Result(f"{name}_cascade_p99", k.p99, "ms", baseline=f"{name}_cloud_only_p99",
                   baseline_value=c.p99, n=k.n,
                   notes="reported: the escalated share pays the cloud round trip"),
            Result(f"{name}_small_answered_p50", m["small_path"].median, "ms",
                   p99=m["small_path"].p99, n=m["small_path"].n,
                   notes="the cascade's requests the small model answered (small-only)"),
            Result(f"{name}_escalated_p50", m["escalated_path"].median, "ms",
                   p99=m["escalated_path"].p99, n=m["escalated_path"].n,
                   notes="the cascade's requests the large model answered"),
        ]
    notes = (f"{broker}; edge daemon, cloud worker (1 intra-op thread each) and this client on "
             f"127.0.0.1, the edge behind the link emulator; {len(y)} test rows per link and "
             f"mode, one row per request, binary tensors; digits data, models trained at "
             f"benchmark time (seed 0); shared, noisy machine")
    title = "cascade: digits, small LogisticRegression on the edge, large MLP in the cloud"
    print_table(title, results)
    print(f"\nsmall-only accuracy {small_acc:.4f}, large-only {large_offline:.4f} (offline); "
          f"calibrated: escalate {cal.chosen.escalation_rate:.1%} for agreement "
          f"{cal.chosen.agreement:.4f}")
    for name in links:
        m = measured[name]
        print(f"{PROFILES[name].describe()}: cascade {m['cascade_acc']:.4f} vs large "
              f"{m['large_acc']:.4f} ({m['acc_ratio']:.2%}), escalated {m['esc_rate']:.1%}; "
              f"p50 {m['cascade'].median:.1f} vs {m['cloud'].median:.1f} ms, p99 "
              f"{m['cascade'].p99:.1f} vs {m['cloud'].p99:.1f} ms")
    extra = {
        "links": {n: PROFILES[n].describe() for n in links},
        "curve_calibration": [p.to_dict() for p in cal.curve],
        "curve_test": [{"escalation_rate": r, "accuracy": a} for r, a in test_curve],
        "edge_cascade_status": status.get("cascade"),
        "seconds": round(time.monotonic() - started, 1),
    }
    out = write_json("cascade", results, args.json_path, notes, extra)
    png = _plot(out.with_suffix(".png"), cascade, test_curve, large_offline, measured, links,
                notes)
    print(f"\nwrote {out} and {png} in {extra['seconds']:.0f} s")
    return 0 if all(r.met is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
