"""Errors (and the one warning class) the compiler raises, placed in the one tree of
:mod:`tandem.protocol.errors`.

Tree (each class subclasses the wire code it carries; where a class is defined is on the right)::

    TandemError
    ├── InvalidArgument               (as is: ONNX Runtime rejects a model or a feed,
    │   │                              from tandem.devices' map_ort_errors)
    │   ├── CompileError              the model, or an argument about it, is unusable
    │   │   ├── InvalidModelError     not ONNX, fails the checker, has a cycle, bad cut, ...
    │   │   ├── SampleError           sample inputs do not match the model, or the model does
    │   │   │                         not run on random ones (give real samples)
    │   │   ├── InputShapeError       an input shape to cost at does not fit the model
    │   │   ├── CascadeError          a cascade's small and large models do not fit together,
    │   │   │                         its scorer has the wrong signature, its calibration
    │   │   │                         target or labels are unusable
    │   │   └── NoValidCut            no interior split point survived discovery and
    │   │                             verification                             (this module)
    │   └── UnsupportedModel          TensorRT cannot parse or build a part   (compiler._tensorrt)
    ├── NotFound
    │   ├── ModelLoadError            the model file or one of its external data files is missing
    │   └── SampleFileNotFound        a sample-input (.npz) file is missing
    ├── FailedPrecondition
    │   ├── OnnxRuntimeError          ONNX Runtime could not load or run a part
    │   │   └── UnsupportedOperator   ... because an operator is not implemented there
    │   │                             (both: tandem.devices.backends.onnxruntime)
    │   └── MissingDependency         an install extra (onnx, onnxruntime, sympy, ...) is missing
    └── InternalError
        └── ExtractionError           a part we built fails the ONNX checker (our bug)

    CompileWarning (UserWarning)      the compile went on, but something the user should know
                                      (symbolic input dims, outputs verification cannot judge,
                                      a cut dropped)

ONNX (``onnx``, protobuf) exceptions are translated in :mod:`tandem.compiler._graph` and
:mod:`tandem.compiler._extract`; ONNX Runtime exceptions at the one boundary of the whole code
base, :func:`tandem.devices.backends.onnxruntime.map_ort_errors`. The original exception is
always chained with ``from``.

Messages name no command-line flag: an error or warning that an option of
:class:`~tandem.compiler.CompileOptions` would address names that option's field in
``options`` (see :func:`with_options`), and the CLI adds its own flag for it.
"""

from __future__ import annotations

from typing import TypeVar

from tandem.devices.backends.onnxruntime import OnnxRuntimeError, UnsupportedOperator
from tandem.protocol.errors import InternalError, InvalidArgument, NotFound

__all__ = [
    "CascadeError",
    "CompileError",
    "CompileWarning",
    "ExtractionError",
    "InputShapeError",
    "InvalidModelError",
    "ModelLoadError",
    "NoValidCut",
    "OnnxRuntimeError",
    "SampleError",
    "SampleFileNotFound",
    "UnsupportedOperator",
    "with_options",
]

_E = TypeVar("_E", bound=BaseException)


def with_options(exc: _E, *options: str) -> _E:
    """Attach the :class:`~tandem.compiler.CompileOptions` fields that would address ``exc``
    (``exc.options``); the CLI names its flags for them. Returns ``exc``."""
    exc.options = tuple(options)  # type: ignore[attr-defined]
    return exc


class CompileError(InvalidArgument):
    """The model, or an argument about it, cannot be compiled."""


class InvalidModelError(CompileError):
    """Not an ONNX model, or one the checker / topological sort rejects."""


class SampleError(CompileError):
    """Sample inputs do not match the model's inputs (names, dtypes, shapes), or the model does
    not run on the random samples the compiler made."""


class InputShapeError(CompileError):
    """An input shape to cost and verify at names no input, has the wrong rank, or contradicts
    a fixed dim of the model."""


class CascadeError(CompileError):
    """The small and large models of a cascade do not fit together (inputs, outputs or the
    declared output mapping), the escalation rule or its scorer does not fit the small model,
    or the calibration target or labels are unusable."""


class NoValidCut(CompileError):
    """No interior split point survived discovery and verification."""


class ModelLoadError(NotFound):
    """The model file, or an external data file it references, does not exist."""


class SampleFileNotFound(NotFound):
    """A sample-input file (.npz) does not exist."""


class ExtractionError(InternalError):
    """A head or tail we extracted is not a valid ONNX model: a bug in the compiler."""


class CompileWarning(UserWarning):
    """Something the user should know about a compile that went on. ``options`` names the
    :class:`~tandem.compiler.CompileOptions` fields that would address it (may be empty)."""

    def __init__(self, message: str, *options: str) -> None:
        super().__init__(message)
        self.options = tuple(options)
