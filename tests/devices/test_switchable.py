"""SwitchableBackend and BackgroundEngineBuild: the switch-while-serving mechanism the edge daemon
and the cloud endpoint share (the TensorRT path itself: tests/edge/test_runtime.py and
tests/cloud/test_tensorrt.py, against the fakes)."""

from __future__ import annotations

import threading

import pytest

from tandem.devices.backends import SwitchableBackend
from tandem.devices.engines import BackgroundEngineBuild
from tandem.protocol.errors import FailedPrecondition, Unavailable


class _Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = True
        self.inputs = self.outputs = ()
        self.calls = 0

    def infer(self, feeds):
        self.calls += 1
        return {"y": self.name}

    def infer_batch(self, requests):
        return [self.infer(r) for r in requests]

    def deactivate(self):
        self.is_active = False


def test_calls_follow_the_switch_and_a_closed_one_refuses_them():
    old, new = _Backend("old"), _Backend("new")
    sw = SwitchableBackend(old, "onnxruntime", name="p")
    assert sw.infer_batch([{}, {}]) == [{"y": "old"}] * 2
    assert sw.switch(new, "tensorrt") and sw.kind == "tensorrt" and sw.switches == 1
    assert not old.is_active  # no call held it: released at once
    assert sw.infer({}) == {"y": "new"}
    sw.close()
    assert not new.is_active and not sw.is_active
    with pytest.raises(FailedPrecondition, match="closed"):
        sw.infer({})
    late = _Backend("late")
    assert not sw.switch(late, "tensorrt") and not late.is_active


def test_a_failing_job_leaves_its_part_alone_and_the_next_one_runs():
    a = SwitchableBackend(_Backend("a-ort"), "onnxruntime")
    b = SwitchableBackend(_Backend("b-ort"), "onnxruntime")
    switched = []

    def fail():
        raise Unavailable("no engine today")

    build = BackgroundEngineBuild(
        [("a", fail, a), ("b", lambda: _Backend("b-trt"), lambda: b),
         ("gone", lambda: _Backend("orphan"), lambda: None)],
        on_switch=lambda part, kind: switched.append((part, kind))).start()
    assert build.wait(10)
    assert a.kind == "onnxruntime" and "no engine today" in build.status["a"]
    assert b.kind == "tensorrt" and b.infer({}) == {"y": "b-trt"}
    assert build.status["b"] == "tensorrt" and switched == [("b", "tensorrt")]
    assert "unloaded" in build.status["gone"]


def test_stop_starts_no_further_job_and_releases_a_late_engine():
    gate, started = threading.Event(), threading.Event()
    made = []

    def slow():
        started.set()
        assert gate.wait(10)
        made.append(_Backend("late"))
        return made[-1]

    target = SwitchableBackend(_Backend("ort"), "onnxruntime")
    never = []
    build = BackgroundEngineBuild([("p", slow, target),
                                   ("q", lambda: never.append(1), target)]).start()
    assert started.wait(10)
    build.stop()
    gate.set()
    assert build.wait(10)
    assert target.kind == "onnxruntime" and not made[0].is_active and never == []
