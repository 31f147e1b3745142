"""TensorRT lowering: the compiler builds engines with :mod:`tandem.devices.engines`.

The build step, the engine key and the engine cache are public API of ``tandem.devices`` (a
device builds the engine a bundle's recipe describes with the same code); the compiler re-exports
them for its own callers.
"""

from tandem.devices.engines import (
    EngineCache,
    EngineFromOnnx,
    EngineKey,
    UnsupportedModel,
    shape_profile_id,
)

__all__ = ["EngineCache", "EngineFromOnnx", "EngineKey", "UnsupportedModel", "shape_profile_id"]
