"""Fixtures for the cloud endpoint: compiled bundles of the example models, a worker running
in-process on its own event loop thread (``run_worker``), and a worker as a real
``tandem cloud serve`` process (``serve_process``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.cloud import Worker, load_config, serve_async
from tandem.protocol import InferenceRequest, Tensor, new_request_id
from tandem.protocol.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict[str, Path]:
    """Bundles (directories) of the example models: residual (fixed batch, three interior
    cuts), multi_io (two inputs, two outputs) and dynamic_batch (batchable)."""
    pytest.importorskip("onnxruntime", reason="the cloud tests run real ONNX Runtime parts")
    from tandem.compiler import BundleFromOnnx, CompileOptions, examples

    out = tmp_path_factory.mktemp("bundles")
    made = {}
    for name, builder in (("residual", examples.residual), ("multi_io", examples.multi_io),
                          ("dynamic_batch", examples.dynamic_batch)):
        model = examples.save(builder(), out / f"{name}.onnx")
        BundleFromOnnx(model, out / name, CompileOptions(targets=("onnxruntime",)))()
        made[name] = out / name
    return made


@pytest.fixture
def repo(tmp_path, compiled) -> Path:
    """A repository holding copies of the residual and dynamic_batch bundles."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("residual", "dynamic_batch"):
        shutil.copytree(compiled[name], root / name)
    return root


@dataclass
class RunningWorker:
    worker: Worker
    http_port: int | None
    loop: asyncio.AbstractEventLoop
    stop_event: asyncio.Event
    thread: threading.Thread

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker did not stop"


@pytest.fixture
def run_worker():
    """``run_worker(repo=..., broker=..., **options)`` starts a worker (and its HTTP port when
    ``http_port`` is given) on a thread of its own; every one is stopped when the test ends."""
    running: list[RunningWorker] = []

    def start(**options: Any) -> RunningWorker:
        options.setdefault("worker_id", f"w{len(running) + 1}")
        options.setdefault("repo_poll_s", 0.2)
        options.setdefault("load_interval_s", 0.2)
        config = load_config(options, env={})
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        started: asyncio.Future = loop.create_future()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve_async(config, stop=stop, started=started))
            except BaseException as exc:  # surfaced to the test below
                errors.append(exc)
            finally:
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        thread = threading.Thread(target=run, name=f"test-worker-{config.worker_id}",
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not started.done():
            if errors:
                raise errors[0]
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.01)
        worker, port = started.result()
        rw = RunningWorker(worker, port, loop, stop, thread)
        running.append(rw)
        return rw

    yield start
    for rw in running:
        rw.stop()


def broker_url(broker) -> str:
    return f"mqtt://127.0.0.1:{broker.port}"


def request_for(bundle_dir: Path, cut_id: int, x: dict[str, np.ndarray] | None = None, *,
                device: str = "cam-01", budget_ms: int = 5000, rid: bytes | None = None,
                priority: int = 0, seed: int = 0) -> tuple[InferenceRequest, dict]:
    """A request for ``cut_id`` of a bundle, with its frontier computed by the bundle's own head
    (or the raw inputs for cut 0), and the full model's outputs for the same input."""
    import onnxruntime as ort

    with load_bundle(bundle_dir) as bundle:
        m = bundle.manifest
        if x is None:
            rng = np.random.default_rng(seed)
            x = {t.name: rng.standard_normal([d if isinstance(d, int) else 2 for d in t.shape])
                 .astype(np.float32) for t in m.inputs}
        full_part = next(c.tail_part for c in m.cuts if c.head_part is None)
        full = ort.InferenceSession(str(bundle.path_of(full_part)))
        expected = dict(zip([o.name for o in full.get_outputs()], full.run(None, x),
                            strict=True))
        cut = m.cut(cut_id)
        if cut.head_part is None:
            frontier = x
        else:
            head = ort.InferenceSession(str(bundle.path_of(cut.head_part)))
            feeds = {i.name: x[i.name] for i in head.get_inputs()}
            values = dict(zip([o.name for o in head.get_outputs()], head.run(None, feeds),
                              strict=True))
            frontier = {t.name: values.get(t.name, x.get(t.name)) for t in cut.frontier}
        tensors = tuple(Tensor.from_array(n, np.ascontiguousarray(a))
                        for n, a in frontier.items())
        request = InferenceRequest(
            id=rid or new_request_id(), device_id=device, model_digest=m.source_digest,
            cut_id=cut_id, budget_ms=budget_ms, tensors=tensors, priority=priority)
        return request, expected


def topic_for(request: InferenceRequest, model: str) -> str:
    return f"tandem/v1/req/{request.device_id}/{model}"


class ServeProcess:
    """``tandem cloud serve`` as a child process; stderr goes to a file the test can read."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "cloud", "serve", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log within {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def serve_process(tmp_path):
    procs: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        p = ServeProcess(tmp_path, *args, env=env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()
