"""Hardware and fleet: device profiles (data), local detection, execution backends behind one
contract (ONNX Runtime; TensorRT + pycuda), and TensorRT engines built, keyed and cached on the
device (:mod:`tandem.devices.engines`). Backends load their runtime on ``activate``."""

from tandem.devices.backends import Backend, TensorMeta
from tandem.devices.detect import Detection, detect, detect_profile
from tandem.devices.engines import DeviceIdentity, EngineCache, EngineFromOnnx, EngineKey
from tandem.devices.profiles import Profile, get_profile, load_profiles

__all__ = [
    "Backend",
    "Detection",
    "DeviceIdentity",
    "EngineCache",
    "EngineFromOnnx",
    "EngineKey",
    "Profile",
    "TensorMeta",
    "detect",
    "detect_profile",
    "get_profile",
    "load_profiles",
]
