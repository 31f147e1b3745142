"""Compiler test fixtures: the TensorRT/pycuda fakes shared with tests/devices."""

from __future__ import annotations

import pytest

from tests._support import fake_tensorrt


@pytest.fixture
def fake_trt(monkeypatch):
    """Fake ``tensorrt``/``pycuda.driver`` in sys.modules (see tests/devices/fake_tensorrt.py)."""
    fake_tensorrt.install(monkeypatch)
    yield fake_tensorrt
    fake_tensorrt.check_clean()


@pytest.fixture(autouse=True)
def _engine_cache_in_tmp(tmp_path, monkeypatch):
    """Engines built in tests go to a per-test cache, never the user's ~/.cache."""
    monkeypatch.setenv("TANDEM_ENGINE_CACHE", str(tmp_path / "engine-cache"))
