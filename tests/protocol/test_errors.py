"""The one exception root and its wire codes."""

from __future__ import annotations

import pickle

import pytest

from tandem.protocol import errors
from tandem.protocol.errors import (
    Code,
    InternalError,
    MalformedMessage,
    PayloadTooLarge,
    ProtocolError,
    TandemError,
    UnknownError,
    UnsupportedVersion,
    error_class,
    error_from_wire,
)

# Wire numbers are forever (SPEC.md §5): a change here breaks every deployed peer.
WIRE = {
    "INVALID_ARGUMENT": 1, "NOT_FOUND": 2, "FAILED_PRECONDITION": 3, "DEADLINE_EXCEEDED": 4,
    "RESOURCE_EXHAUSTED": 5, "UNAVAILABLE": 6, "PAYLOAD_TOO_LARGE": 7, "UNSUPPORTED_VERSION": 8,
    "PERMISSION_DENIED": 9, "INTERNAL": 10, "UNKNOWN": 11, "HANDLER_FAILED": 12,
}
RETRYABLE = {Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE}


def test_wire_numbers_never_change():
    assert {c.name: int(c) for c in Code} == WIRE


@pytest.mark.parametrize("code", list(Code))
def test_every_code_has_one_class_that_round_trips(code):
    cls = error_class(code)
    assert issubclass(cls, TandemError) and cls.code is code
    assert cls.retryable is (code in RETRYABLE)
    for retryable in (False, True):
        exc = error_from_wire(int(code), "boom", retryable)
        assert type(exc) is cls and exc.message == "boom" and exc.retryable is retryable


@pytest.mark.parametrize("number", [0, -1, 42, 2**40])
def test_unknown_codes_are_unknown_errors_with_the_number(number):
    exc = error_from_wire(number, "from the future", False)
    assert type(exc) is UnknownError and str(number) in exc.message
    assert not isinstance(exc, InternalError)  # InternalError means our bug, nothing else


@pytest.mark.parametrize("cls, code", [
    (MalformedMessage, Code.INVALID_ARGUMENT),
    (PayloadTooLarge, Code.PAYLOAD_TOO_LARGE),
    (UnsupportedVersion, Code.UNSUPPORTED_VERSION),
])
def test_decoder_errors_are_protocol_errors_with_their_code(cls, code):
    exc = cls("bad bytes")
    assert isinstance(exc, ProtocolError) and isinstance(exc, error_class(code))
    assert exc.code is code


def test_pickling_keeps_class_message_and_retryable():
    exc = errors.Unavailable("broker down", retryable=False)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is errors.Unavailable and back.message == "broker down"
    assert back.retryable is False


def test_the_tree_in_the_docstring_names_every_error_class():
    classes = [name for name in errors.__all__
               if isinstance(getattr(errors, name), type)
               and issubclass(getattr(errors, name), TandemError)]
    missing = [name for name in classes if name not in (errors.__doc__ or "")]
    assert not missing, f"error tree docstring does not mention {missing}"
