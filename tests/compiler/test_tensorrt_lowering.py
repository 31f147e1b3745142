"""The compiler lowers parts to TensorRT engines with tandem.devices.engines (one implementation:
the tests of the build, the key and the cache live in tests/devices/test_engine_*.py)."""

import tandem.compiler
from tandem.compiler import _tensorrt
from tandem.devices import engines


def test_the_compiler_uses_the_devices_engine_api():
    for name in ("EngineCache", "EngineFromOnnx", "EngineKey", "UnsupportedModel",
                 "shape_profile_id"):
        assert getattr(_tensorrt, name) is getattr(engines, name)
    for name in ("EngineCache", "EngineFromOnnx", "EngineKey", "UnsupportedModel"):
        assert getattr(tandem.compiler, name) is getattr(engines, name)
