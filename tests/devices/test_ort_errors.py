"""devices.backends.onnxruntime.map_ort_errors: the one ONNX Runtime boundary of the code base."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tandem.devices.backends import (
    OnnxRuntimeBackend,
    OnnxRuntimeError,
    UnsupportedOperator,
    map_ort_errors,
)
from tandem.devices.backends.onnxruntime import quiet_run_options, session_options
from tandem.protocol.errors import InternalError, InvalidArgument, NotFound, TandemError


def _gather():
    table = numpy_helper.from_array(np.ones((5, 2), np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "i"], ["y"])], "g",
                              [helper.make_tensor_value_info("i", 7, [3])],
                              [helper.make_tensor_value_info("y", 1, None)], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), session_options(),
                                providers=["CPUExecutionProvider"])


def test_each_kind_maps_to_its_tandem_error():
    sess = _session(_gather())
    cases = [
        (lambda: sess.run(None, {"i": np.array([1, 2, 9])}, quiet_run_options()),
         InvalidArgument, "indices element out of data bounds"),
        (lambda: sess.run(None, {}), InvalidArgument, "missing from input feed"),
        (lambda: ort.InferenceSession("/nonexistent/model.onnx"), NotFound, ""),
        (lambda: ort.InferenceSession(b"junk"), InvalidArgument, ""),
    ]
    for call, cls, text in cases:
        with pytest.raises(cls) as err, map_ort_errors("doing it"):
            call()
        assert str(err.value).startswith("doing it: ONNX Runtime: ")
        assert "[ONNXRuntimeError]" not in str(err.value) and text in str(err.value)
        assert err.value.__cause__ is not None and not isinstance(err.value, InternalError)


def test_unknown_operators_are_unsupported_not_internal():
    model = _gather()
    model.graph.node[0].op_type, model.graph.node[0].domain = "Nope", "x.test"
    model.opset_import.append(helper.make_opsetid("x.test", 1))
    with pytest.raises(UnsupportedOperator) as err, map_ort_errors("loading"):
        _session(model)
    assert isinstance(err.value, OnnxRuntimeError) and "Nope" in str(err.value)


def test_other_exceptions_and_tandem_errors_pass_through():
    with pytest.raises(KeyError), map_ort_errors("x"):
        raise KeyError("ours")
    with pytest.raises(NotFound, match=r"^as is$"), map_ort_errors("x"):
        raise NotFound("as is")


def test_a_failing_run_prints_nothing_of_its_own(capfd):
    sess = _session(_gather())
    with pytest.raises(TandemError), map_ort_errors("run"):
        sess.run(None, {"i": np.array([7, 8, 9])}, quiet_run_options())
    with OnnxRuntimeBackend(_gather().SerializeToString()) as backend, \
            pytest.raises(InvalidArgument):
        backend.infer({"i": np.array([7, 8, 9])})
    assert "\x1b[" not in capfd.readouterr().err  # no coloured ORT log line


def test_session_options_are_quiet_unless_asked():
    assert session_options().log_severity_level == 4
    loud = session_options(quiet=False, intra_op_threads=2)
    assert loud.intra_op_num_threads == 2 and loud.log_severity_level != 4
