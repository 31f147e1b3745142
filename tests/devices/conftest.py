"""Fixtures for device tests: the faithful TensorRT/pycuda fakes installed into sys.modules."""

from __future__ import annotations

import importlib.util

import pytest

from tests._support import fake_tensorrt


@pytest.fixture
def fake_trt(monkeypatch):
    """Fake ``tensorrt``, ``pycuda`` and ``pycuda.driver`` in sys.modules, fresh per test."""
    fake_tensorrt.install(monkeypatch)
    yield fake_tensorrt
    fake_tensorrt.check_clean()


def real_tensorrt_available() -> bool:
    """True only where the real tensorrt and pycuda are importable (an NVIDIA GPU machine)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda"))
    except (ImportError, ValueError):
        return False


GPU_SKIP_REASON = "TensorRT/pycuda not importable (no NVIDIA GPU on this machine)"
