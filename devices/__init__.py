"""Hardware and fleet: device profiles (data), local detection, and execution backends behind
one contract (ONNX Runtime; TensorRT + pycuda). Backends load their runtime on ``activate``."""

from tandem.devices.backends import Backend, TensorMeta
from tandem.devices.detect import Detection, detect, detect_profile
from tandem.devices.profiles import Profile, get_profile, load_profiles

__all__ = [
    "Backend",
    "Detection",
    "Profile",
    "TensorMeta",
    "detect",
    "detect_profile",
    "get_profile",
    "load_profiles",
]
