"""Lazy import of heavy optional libraries, failing with the install extra to use."""

from __future__ import annotations

import importlib
from types import ModuleType

from tandem.protocol.errors import MissingDependency

__all__ = ["lazy_module", "require"]

_EXTRA_FOR = {
    "onnx": "cpu",
    "onnxruntime": "cpu",
    "tensorrt": "tensorrt",
    "pycuda": "tensorrt",
    "pycuda.driver": "tensorrt",
    "zeroconf": "discovery",
}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = extra or _EXTRA_FOR.get(module) or _EXTRA_FOR.get(module.split(".")[0], "dev")
        raise MissingDependency(
            f"{module} is not installed: pip install 'tandem-rt[{extra}]' ({exc})"
        ) from exc


class _LazyModule:
    """Stands in for a module and imports it (via :func:`require`) on first attribute use."""

    def __init__(self, name: str, extra: str | None) -> None:
        self._name = name
        self._extra = extra

    def __getattr__(self, attr: str):
        return getattr(require(self._name, self._extra), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str, extra: str | None = None) -> ModuleType:
    """A module object that imports ``name`` when an attribute is first read."""
    return _LazyModule(name, extra)  # type: ignore[return-value]
