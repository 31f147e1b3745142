"""The model repository behind a real worker (in-memory transport, real ONNX Runtime parts on
real bundles on disk): LRU unload under a memory budget, archive bundles, tampered bundles
rejected at scan, and a part changed on disk after the scan caught when it loads."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tandem.cloud import Worker, load_config
from tandem.protocol import (
    FailedPrecondition,
    MemoryBroker,
    MemoryTransport,
    NotFound,
    ResourceExhausted,
    TransportConfig,
    new_request_id,
)
from tandem.protocol.bundle import load_bundle, pack
from tests.cloud.conftest import request_for, topic_for


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _worker(broker: MemoryBroker, repo: Path, **options) -> Worker:
    config = load_config({"repo": repo, "worker_id": "repo", "load_interval_s": 0.05,
                          **options}, env={})
    transport = MemoryTransport(broker, Worker(config).transport_config())
    await transport.connect()
    worker = Worker(config, transport=transport)
    await worker.start()
    return worker


async def _close(worker: Worker) -> None:
    await worker.stop()
    await worker.transport.close()


def _assert_outputs(response, expected: dict) -> None:
    got = {o.name: o.to_array() for o in response.outputs}
    assert got, "no outputs"
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-5,
                                   err_msg=f"output {name}")


def _flip_a_byte_in_place(path: Path) -> None:
    """Change one byte of ``path`` keeping its size and mtime (what bit rot or a careless
    in-place edit looks like: nothing a stat-based scan can notice)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_lru_unload_keeps_loaded_parts_within_the_memory_budget(tmp_path, compiled):
    """Three parts, a budget that holds any two but not three: requests A, B, A, C leave A and
    C loaded (B, the least recently used, unloaded), every answer correct, and the
    repository's loaded bytes never over the budget."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(compiled["residual"], repo / "residual")
    with load_bundle(compiled["residual"]) as b:
        cuts = [c.id for c in b.manifest.cuts if c.tail_part is not None]
        digest = b.manifest.source_digest
    assert len(cuts) >= 3, cuts
    a, b_, c = cuts[:3]

    async def main() -> None:
        broker = MemoryBroker()
        worker = await _worker(broker, repo)
        r = worker.repo
        sizes = {cut: r.resolve(digest, cut).estimate_bytes for cut in (a, b_, c)}
        assert all(s > 0 for s in sizes.values())
        # any two fit, three do not
        r.memory_budget_bytes = sum(sizes.values()) - 1
        assert all(sizes[x] + sizes[y] <= r.memory_budget_bytes
                   for x, y in ((a, b_), (a, c), (b_, c)))
        assert r.loaded == [] and r.loaded_bytes == 0  # nothing loaded before a request
        async with MemoryTransport(broker, TransportConfig()) as client:
            async def ask(cut: int, seed: int) -> None:
                request, expected = request_for(compiled["residual"], cut, seed=seed)
                _assert_outputs(await client.request(topic_for(request, "residual"), request),
                                expected)
                assert r.loaded_bytes <= r.memory_budget_bytes
                assert r.loaded_bytes == sum(p.estimate_bytes for p in r.loaded)

            await ask(a, 1)
            await ask(b_, 2)
            assert {p.cut.id for p in r.loaded} == {a, b_}
            await ask(a, 3)  # a is now the most recently used
            await ask(c, 4)  # over the budget: b (least recently used) goes, not a
            assert {p.cut.id for p in r.loaded} == {a, c}
            assert r.resolve(digest, b_).backend_kind == "unloaded"
            # b again: loaded once more (a is older than c now, so a goes), answers still right
            await ask(b_, 5)
            assert {p.cut.id for p in r.loaded} == {b_, c}
            # and with a budget for one part only, alternating requests keep working
            r.memory_budget_bytes = max(sizes.values())
            for i in range(6):
                cut = (a, b_)[i % 2]
                await ask(cut, 10 + i)
                assert [p.cut.id for p in r.loaded] == [cut]
        assert worker.metrics.value("tandem_cloud_requests_total",
                                    {"model": "residual", "status": "OK", "via": "mqtt"}) == 11
        await _close(worker)

    run(main())


def test_a_part_alone_over_the_budget_is_refused_and_others_serve(tmp_path, compiled):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(compiled["residual"], repo / "residual")

    async def main() -> None:
        broker = MemoryBroker()
        worker = await _worker(broker, repo)
        request, _ = request_for(compiled["residual"], 0)
        part = worker.repo.resolve(request.model_digest, 0)
        worker.repo.memory_budget_bytes = part.estimate_bytes - 1
        async with MemoryTransport(broker, TransportConfig()) as client:
            with pytest.raises(ResourceExhausted, match="over the memory budget") as err:
                await client.request(topic_for(request, "residual"), request)
            assert not err.value.retryable  # retrying cannot help
            assert worker.repo.loaded == []
            worker.repo.memory_budget_bytes = 1 << 30
            smaller = next(p.cut.id for p in part.bundle.parts.values()
                           if p.estimate_bytes < part.estimate_bytes)
            other, expected_other = request_for(compiled["residual"], smaller)
            _assert_outputs(await client.request(topic_for(other, "residual"), other),
                            expected_other)
        await _close(worker)

    run(main())


def test_an_archive_bundle_in_the_repo_is_served(tmp_path, compiled):
    repo = tmp_path / "repo"
    repo.mkdir()
    archive = pack(compiled["residual"], repo / "residual.tar.zst")
    assert archive.is_file() and not (repo / "residual").exists()

    async def main() -> None:
        broker = MemoryBroker()
        worker = await _worker(broker, repo)
        (entry,) = worker.repo.entries
        assert entry.is_archive and entry.path == archive and worker.repo.rejected == {}
        with load_bundle(compiled["residual"]) as b:
            cuts = [c.id for c in b.manifest.cuts if c.tail_part is not None]
            assert entry.digest == b.digest  # the same bundle, packed
        async with MemoryTransport(broker, TransportConfig()) as client:
            for cut in cuts:  # cut 0 (the whole model) and every interior cut
                request, expected = request_for(compiled["residual"], cut, seed=cut)
                _assert_outputs(await client.request(topic_for(request, "residual"), request),
                                expected)
        await _close(worker)

    run(main())


def test_a_tampered_bundle_is_rejected_at_scan_and_the_others_serve(tmp_path, compiled):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(compiled["residual"], repo / "residual")
    shutil.copytree(compiled["dynamic_batch"], repo / "dynamic_batch")
    with load_bundle(repo / "dynamic_batch") as b:
        victim = b.path_of(next(f.path for f in b.manifest.files if f.path.endswith(".onnx")))
    _flip_a_byte_in_place(victim)

    async def main() -> None:
        broker = MemoryBroker()
        worker = await _worker(broker, repo)
        rejected = worker.repo.rejected
        assert list(rejected) == [str(repo / "dynamic_batch")], rejected
        assert "sha256" in rejected[str(repo / "dynamic_batch")] or \
            "digest" in rejected[str(repo / "dynamic_batch")]
        assert [e.model_name for e in worker.repo.entries] == ["residual"]
        assert worker.metrics.value("tandem_cloud_bundles", {"state": "rejected"}) == 1
        assert worker.metrics.value("tandem_cloud_bundles", {"state": "served"}) == 1
        assert worker.ready  # verified means served or rejected: the worker is ready
        async with MemoryTransport(broker, TransportConfig()) as client:
            bad, _ = request_for(compiled["dynamic_batch"], 0)
            with pytest.raises(NotFound, match="unknown model") as err:
                await client.request(topic_for(bad, "dynamic_batch"), bad)
            assert "rejected" in str(err.value)  # it says where to look
            good, expected = request_for(compiled["residual"], 0)
            _assert_outputs(await client.request(topic_for(good, "residual"), good), expected)
            # a rescan of the same bytes keeps it rejected (and does not re-verify it)
            report = worker.repo.scan()
            assert report.rejected == () and list(worker.repo.rejected) == list(rejected)
        await _close(worker)

    run(main())


def test_a_part_changed_on_disk_after_the_scan_fails_its_requests_only(tmp_path, compiled):
    """The scan verified the bundle; a part file then changes in place (same size, same mtime:
    no rescan can see it). Its first load hashes it again: FAILED_PRECONDITION for its requests,
    every time; the worker keeps serving the other bundles."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(compiled["residual"], repo / "residual")
    shutil.copytree(compiled["dynamic_batch"], repo / "dynamic_batch")

    async def main() -> None:
        broker = MemoryBroker()
        worker = await _worker(broker, repo)
        request, _ = request_for(compiled["dynamic_batch"], 0)
        part = worker.repo.resolve(request.model_digest, 0)
        assert part.backend_kind == "unloaded"
        _flip_a_byte_in_place(part.bundle.bundle.path_of(part.path))
        assert worker.repo.scan().changed is False  # the scan cannot notice it
        async with MemoryTransport(broker, TransportConfig()) as client:
            topic = topic_for(request, "dynamic_batch")
            with pytest.raises(FailedPrecondition, match="changed on disk"):
                await client.request(topic, request)
            with pytest.raises(FailedPrecondition, match="changed on disk"):
                await client.request(topic, replace(request, id=new_request_id()))
            assert part.backend_kind == "unloaded" and worker.repo.loaded == []
            good, expected = request_for(compiled["residual"], 0)
            _assert_outputs(await client.request(topic_for(good, "residual"), good), expected)
        assert worker.state == "serving"
        assert worker.metrics.value(
            "tandem_cloud_requests_total",
            {"model": "dynamic_batch", "status": "FAILED_PRECONDITION", "via": "mqtt"}) == 2
        await _close(worker)

    run(main())


def test_loads_on_two_compute_threads_never_pass_the_budget_together(tmp_path, compiled):
    """Two compute threads load two parts at once under a budget for one. Each load reserves
    its bytes first: the second waits while the first part computes (busy), then unloads it
    and loads its own. Without the reservation both would load side by side (the factory
    below lets two loads meet at a barrier), twice the budget. The repository's loaded bytes,
    sampled all along, never pass the budget; a load that finds no room within
    ``room_wait_s`` answers RESOURCE_EXHAUSTED (retryable) and is not remembered as the part's
    failure."""
    import contextlib
    import threading
    import time

    from tandem.cloud import ModelRepository
    from tandem.devices.backends import OnnxRuntimeBackend

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(compiled["residual"], repo / "residual")
    meet = threading.Barrier(2, timeout=1.0)
    in_factory: list[int] = []

    def factory(part, source):
        in_factory.append(part.cut.id)
        with contextlib.suppress(threading.BrokenBarrierError):
            meet.wait()  # two loads at once would pass here together
        backend = OnnxRuntimeBackend(source, optimized=part.optimized, name=part.label)
        backend.activate()
        return backend

    r = ModelRepository(repo, backend_factory=factory)
    r.scan()
    (entry,) = r.entries
    a, b = sorted(entry.parts.values(), key=lambda p: p.cut.id)[:2]
    r.memory_budget_bytes = max(a.estimate_bytes, b.estimate_bytes)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], r.loaded_bytes)
            time.sleep(0.0005)

    errors: list[BaseException] = []

    def compute(part, hold_s: float) -> None:
        try:
            r.acquire(part)
            time.sleep(hold_s)  # a batch running on it
            r.release(part)
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        threads = [threading.Thread(target=compute, args=(a, 0.3)),
                   threading.Thread(target=compute, args=(b, 0.0))]
        threads[0].start()
        time.sleep(0.05)  # a's load first
        threads[1].start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert peak[0] <= r.memory_budget_bytes, (peak[0], r.memory_budget_bytes)
        assert [p.cut.id for p in r.loaded] == [b.cut.id]  # a unloaded once it was idle
        assert sorted(in_factory) == sorted([a.cut.id, b.cut.id])

        # no room within room_wait_s (b busy for longer): retryable, and a may load later
        r.room_wait_s = 0.1
        slow = threading.Thread(target=compute, args=(b, 1.0))
        slow.start()
        time.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="no room") as err:
            r.acquire(a)
        assert err.value.retryable and a.load_error is None
        slow.join(30)
        r.acquire(a)  # b is idle now: it goes, a loads
        r.release(a)
        assert [p.cut.id for p in r.loaded] == [a.cut.id]
        assert peak[0] <= r.memory_budget_bytes
    finally:
        stop.set()
        sampler.join()
        r.close()
