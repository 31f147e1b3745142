"""The one dtype and encoding table, checked against ONNX, ONNX Runtime, numpy and the codec."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tandem.protocol import dtypes
from tandem.protocol.bundle import DTYPES as MANIFEST_DTYPES
from tandem.protocol.bundle import ENCODINGS as MANIFEST_ENCODINGS
from tandem.protocol.codec import decode, encode
from tandem.protocol.dtypes import (
    DTYPES,
    DType,
    Encoding,
    UnsupportedDType,
    by_name,
    by_numpy,
    by_onnx,
    by_ort,
    by_wire,
    encoding_by_name,
    encoding_name,
    encodings_for,
    storage_itemsize,
    wire_dtype_for,
)
from tandem.protocol.errors import InvalidArgument
from tandem.protocol.messages import InferenceRequest
from tandem.protocol.tensors import Tensor

REPO = Path(__file__).resolve().parents[2]


def test_every_row_agrees_with_onnx():
    names = {code: name for name, code in TensorProto.DataType.items()}
    for info in DTYPES:
        assert info.onnx in names, info
        if info.numpy is not None:
            assert np.dtype(helper.tensor_dtype_to_np_dtype(info.onnx)) == info.numpy, info
            assert info.numpy.itemsize == info.itemsize
    assert len({i.onnx for i in DTYPES}) == len({i.name for i in DTYPES}) == len(DTYPES)


def _ort_type(code: int) -> str | None:
    ort = pytest.importorskip("onnxruntime")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", code, [1])],
        [helper.make_tensor_value_info("y", code, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    try:
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    except Exception:  # ONNX Runtime has no kernel for this type here (complex, 4-bit)
        return None
    return sess.get_inputs()[0].type


def test_ort_type_strings_are_what_onnx_runtime_reports():
    checked = 0
    for info in DTYPES:
        reported = _ort_type(info.onnx)
        if reported is not None:
            assert reported == info.ort, info
            assert by_ort(reported) is info
            checked += 1
    assert checked >= 17  # every type this ONNX Runtime can load


def test_wire_rows_round_trip_through_the_codec():
    assert {i.wire for i in DTYPES if i.wire is not None} == set(DType)
    tensors = []
    for d in DType:
        info = by_wire(d)
        assert info.wire is d and info.itemsize == d.itemsize
        arr = (np.arange(6).reshape(2, 3) % 2).astype(d.numpy_dtype)
        tensors.append(Tensor.from_array(info.name, arr, dtype=d))
    msg = decode(encode(InferenceRequest(bytes(16), "cam", "m", 1, 10, tuple(tensors))))
    for t, d in zip(msg.tensors, DType, strict=True):
        assert t.dtype is d and t.to_array().dtype == d.numpy_dtype


def test_lookups_and_their_errors():
    assert by_name("float32").onnx == TensorProto.FLOAT
    assert by_onnx(TensorProto.DOUBLE).name == "float64"
    assert by_onnx(np.int32(1)).name == "float32"
    assert by_numpy(np.float32) is by_numpy(np.dtype(">f4")) is by_name("float32")
    assert by_numpy(np.bool_).wire is DType.BOOL
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert by_numpy(ml_dtypes.bfloat16).wire is DType.BFLOAT16
    for bad, call in (("float128", by_name), (999, by_onnx), ("tensor(x)", by_ort),
                      (np.dtype("U4"), by_numpy), (42, by_wire), (None, by_name), ("1", by_onnx)):
        with pytest.raises(UnsupportedDType):
            call(bad)
    assert issubclass(UnsupportedDType, InvalidArgument)


@pytest.mark.parametrize(("onnx_code", "name"), [
    (TensorProto.DOUBLE, "float64"), (TensorProto.INT16, "int16"), (TensorProto.UINT16, "uint16"),
    (TensorProto.STRING, "string"), (TensorProto.FLOAT8E4M3FN, "float8e4m3fn"),
    (TensorProto.UINT64, "uint64"), (TensorProto.INT4, "int4"),
])
def test_wire_dtype_for_names_the_type_that_cannot_travel(onnx_code, name):
    with pytest.raises(UnsupportedDType, match=rf"\b{name}\b.*cannot travel"):
        wire_dtype_for(onnx_code)
    # ...and the codec indeed has no code for it
    if by_onnx(onnx_code).numpy is not None:
        with pytest.raises(InvalidArgument):
            Tensor.from_array("x", np.zeros(2, by_onnx(onnx_code).numpy))


def test_wire_dtype_for_the_types_that_travel():
    assert wire_dtype_for(TensorProto.FLOAT) is DType.FLOAT32
    assert wire_dtype_for(TensorProto.BFLOAT16) is DType.BFLOAT16
    assert wire_dtype_for(TensorProto.BOOL) is DType.BOOL


def test_encodings_apply_to_float32_only():
    assert encodings_for(DType.FLOAT32) == (Encoding.RAW, Encoding.FP16, Encoding.INT8_AFFINE)
    assert by_name("float32").encodings == encodings_for(DType.FLOAT32)
    for d in DType:
        if d is not DType.FLOAT32:
            assert encodings_for(d) == (Encoding.RAW,)
            assert storage_itemsize(d, Encoding.FP16) is None
            with pytest.raises(InvalidArgument, match="FLOAT32"):
                Tensor.from_array("x", np.zeros(2, d.numpy_dtype), Encoding.FP16, dtype=d)
    assert by_name("float64").encodings == ()
    assert storage_itemsize(DType.FLOAT32, Encoding.INT8_AFFINE) == 1
    assert [encoding_by_name(n) for n in MANIFEST_ENCODINGS] == [Encoding.FP16,
                                                                 Encoding.INT8_AFFINE]
    assert [encoding_name(e) for e in (Encoding.FP16, Encoding.INT8_AFFINE)] == ["fp16", "int8"]
    with pytest.raises(UnsupportedDType):
        encoding_by_name("int4")
    with pytest.raises(UnsupportedDType):
        encoding_name(Encoding.RAW)


def test_the_bundle_schema_reads_the_same_table():
    assert frozenset(i.name for i in DTYPES) == MANIFEST_DTYPES


# Spellings that only a private dtype table would contain.
_TABLE_SPELLINGS = re.compile(r'"tensor\((float|double|int64|bool)\)"|\bfloat8e4m3fnuz\b|'
                              r'\{\s*"fp16"\s*:\s*(tensors\.)?Encoding')


def test_no_other_module_keeps_a_dtype_table():
    found = []
    for folder in ("protocol", "devices", "compiler", "edge", "cloud", "tandem"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "dtypes.py" and path.parent.name == "protocol":
                continue
            if _TABLE_SPELLINGS.search(path.read_text(encoding="utf-8")):
                found.append(str(path.relative_to(REPO)))
    assert not found, f"dtype tables outside tandem.protocol.dtypes: {found}"


def test_onnx_numpy_mapping_is_not_wider_than_the_table():
    # every ONNX type numpy can hold natively (no ml_dtypes) has a row
    for name, code in TensorProto.DataType.items():
        if code == 0:
            continue
        try:
            nd = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code))
        except Exception:
            continue
        if nd.kind in "biufc" and nd.name in {i.name for i in DTYPES} | {"float64", "bool"}:
            assert by_onnx(code).numpy == nd, name


def test_public_surface():
    assert all(hasattr(dtypes, name) for name in dtypes.__all__)
    assert "wire_dtype_for" in dtypes.__all__ and "DTypeInfo" in dtypes.__all__
