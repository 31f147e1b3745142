"""Errors the compiler raises, placed in the one tree of :mod:`tandem.protocol.errors`.

Tree (each class subclasses the wire code it carries)::

    TandemError
    ├── InvalidArgument
    │   └── CompileError              the model (or an argument about it) is unusable
    │       ├── InvalidModelError     not ONNX, fails the checker, has a cycle, bad cut, ...
    │       └── SampleError           sample inputs (.npz or dicts) do not match the model
    ├── NotFound
    │   ├── ModelLoadError            the model file or one of its external data files is missing
    │   └── SampleFileNotFound        a sample-input (.npz) file is missing
    ├── FailedPrecondition
    │   └── RuntimeCheckError         ONNX Runtime could not load or run a part
    │       └── UnsupportedOperator   ... because an operator is not implemented there
    └── InternalError
        └── ExtractionError           a part we built fails the ONNX checker (our bug)

ONNX (``onnx``, protobuf) exceptions are translated in :mod:`tandem.compiler._graph` and
:mod:`tandem.compiler._extract`; ONNX Runtime exceptions in :mod:`tandem.compiler._verify` (one
boundary,
``_ort_call``). The original exception is always chained with ``from``.
"""

from __future__ import annotations

from tandem.protocol.errors import FailedPrecondition, InternalError, InvalidArgument, NotFound

__all__ = [
    "CompileError",
    "ExtractionError",
    "InvalidModelError",
    "ModelLoadError",
    "RuntimeCheckError",
    "SampleError",
    "SampleFileNotFound",
    "UnsupportedOperator",
]


class CompileError(InvalidArgument):
    """The model, or an argument about it, cannot be compiled."""


class InvalidModelError(CompileError):
    """Not an ONNX model, or one the checker / topological sort rejects."""


class SampleError(CompileError):
    """Sample inputs do not match the model's inputs (names, dtypes, shapes)."""


class ModelLoadError(NotFound):
    """The model file, or an external data file it references, does not exist."""


class SampleFileNotFound(NotFound):
    """A sample-input file (.npz) does not exist."""


class RuntimeCheckError(FailedPrecondition):
    """ONNX Runtime could not load or run a model part."""


class UnsupportedOperator(RuntimeCheckError):
    """ONNX Runtime has no implementation for an operator the part uses."""


class ExtractionError(InternalError):
    """A head or tail we extracted is not a valid ONNX model: a bug in the compiler."""
