"""Whole-system fixtures: a real mosquitto (tests/_support/broker.py), real ``tandem cloud
serve`` workers and a real ``tandem edge run`` daemon, each a process started by the test and
stopped (killed if need be) when it ends."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests._support.broker import free_port
from tests._support.processes import TandemProcess

pytest.importorskip("onnxruntime", reason="the system runs real ONNX Runtime parts")
pytest.importorskip("aiohttp", reason="the daemon's API and the worker's HTTP port need aiohttp")

# Fast knobs for tests: few profiling runs, quick probes and heartbeats, no mDNS.
EDGE_ENV = {"TANDEM_PROFILE_RUNS": "3", "TANDEM_PROFILE_WARMUP": "1",
            "TANDEM_PROBE_INTERVAL_S": "0.2", "TANDEM_HEARTBEAT_S": "0.5",
            "TANDEM_ADVERTISE": "false", "TANDEM_PROFILE": "cpu-x86_64",
            "TANDEM_LOG_LEVEL": "info", "TANDEM_CONFIG": "", "TANDEM_DEVICE_PROFILE": ""}
WORKER_ENV = {"TANDEM_LOAD_INTERVAL_S": "0.2", "TANDEM_REPO_POLL_S": "0.2", "TANDEM_CONFIG": ""}


def compile_bundle(directory: Path, kind: str, *, version: int | None = None,
                   sign_key: Path | None = None) -> Path:
    from tandem.compiler import BundleFromOnnx, CompileOptions
    from tandem.compiler import examples as ex

    model = ex.save(getattr(ex, kind)(), directory / f"{kind}.onnx")
    out = directory / (kind if version is None else f"{kind}-v{version}")
    shapes = {"image": (1, 3, 32, 32)} if kind == "dynamic_hw" else None
    BundleFromOnnx(model, out, CompileOptions(targets=("onnxruntime",), input_shapes=shapes))()
    if version is not None:
        _set_version(out, version)
    if sign_key is not None:
        from tandem.protocol.bundle import sign_bundle

        sign_bundle(out, sign_key)
    return out


def _set_version(bundle: Path, version: int) -> None:
    """Rewrite the manifest with another bundle_version and model_version (as a newer release
    of the same model would be)."""
    import dataclasses

    from tandem.protocol.bundle import MANIFEST_NAME, Manifest

    m = Manifest.from_json((bundle / MANIFEST_NAME).read_bytes())
    m = dataclasses.replace(m, bundle_version=version, model_version=str(version))
    (bundle / MANIFEST_NAME).write_bytes(m.to_bytes())


@pytest.fixture(scope="session")
def e2e_bundles(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("e2e-bundles")
    return {kind: compile_bundle(out, kind) for kind in ("residual", "dynamic_hw")}


class System:
    """Processes of one whole-system test: workers over a repository, one edge daemon."""

    def __init__(self, tmp_path: Path, broker) -> None:
        self.tmp = tmp_path
        self.broker = broker
        self.repo = tmp_path / "repo"
        self.repo.mkdir()
        self.procs: list[TandemProcess] = []
        self.edge: TandemProcess | None = None
        self.api_port = free_port()
        self.state_dir = tmp_path / "edge-state"

    @property
    def broker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.broker.port}"

    def add_to_repo(self, bundle: Path) -> Path:
        target = self.repo / bundle.name
        shutil.copytree(bundle, target)
        return target

    def start_worker(self, worker_id: str = "w1", *args: str) -> TandemProcess:
        p = TandemProcess(self.tmp, "cloud", "serve", "--repo", str(self.repo), "--broker",
                          self.broker_url, "--worker-id", worker_id, *args, env=WORKER_ENV,
                          name=f"worker-{worker_id}")
        self.procs.append(p)
        p.wait_for_log(f"worker {worker_id} serving")
        return p

    def start_edge(self, bundle: Path | None, *args: str, env: dict[str, str] | None = None,
                   wait_cloud: bool = True, broker: bool = True) -> TandemProcess:
        cli = ["edge", "run", "--device-id", "cam-e2e", "--api-port", str(self.api_port),
               "--state-dir", str(self.state_dir)]
        if broker:
            cli += ["--broker", self.broker_url]
        if bundle is not None:
            cli += ["--bundle", str(bundle)]
        p = TandemProcess(self.tmp, *cli, *args, env={**EDGE_ENV, **(env or {})}, name="edge")
        self.procs.append(p)
        self.edge = p
        p.wait_for_log("local API on")
        if wait_cloud:
            self.wait_link(True)
        return p

    def client(self):
        from tandem.edge import Client

        return Client(f"http://127.0.0.1:{self.api_port}")

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def wait_link(self, available: bool, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.status()["link"]["available"] != available:
            assert time.monotonic() < deadline, f"the link did not become available={available}"
            time.sleep(0.05)

    def close(self) -> None:
        for p in self.procs:
            p.close()


@pytest.fixture
def system(tmp_path, mosquitto):
    s = System(tmp_path, mosquitto)
    yield s
    s.close()
