"""Lazy import of heavy optional libraries, failing with the install extra to use."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from tandem.protocol.errors import MissingDependency

__all__ = ["install_command", "lazy_module", "require"]

_EXTRA_FOR = {
    "onnx": "cpu",
    "onnxruntime": "cpu",
    "tensorrt": "tensorrt",
    "pycuda": "tensorrt",
    "pycuda.driver": "tensorrt",
    "zeroconf": "discovery",
}


_JETSON_NOTE = (
    "; on a Jetson, TensorRT comes with JetPack, not from PyPI: make the virtual environment "
    "with --system-site-packages so it sees JetPack's tensorrt"
)


def _checkout() -> Path | None:
    """The source checkout this code runs from (an editable install), or None for a wheel."""
    root = Path(__file__).resolve().parent.parent  # <checkout>/protocol/lazy.py
    pyproject = root / "pyproject.toml"
    try:
        if (root / "protocol").is_dir() and 'name = "tandem-rt"' in pyproject.read_text():
            return root
    except OSError:
        pass
    return None


def install_command(extra: str) -> str:
    """The command that installs ``extra`` for this installation: in a source checkout
    ``cd <checkout> && pip install -e '.[extra]'``, else ``pip install 'tandem-rt[extra]'``."""
    root = _checkout()
    if root is not None:
        return f"cd {root} && pip install -e '.[{extra}]'"
    return f"pip install 'tandem-rt[{extra}]'"


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming the extra that provides it
    and the command that installs it here."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = extra or _EXTRA_FOR.get(module) or _EXTRA_FOR.get(module.split(".")[0], "dev")
        missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and \
            module.split(".")[0] == exc.name.split(".")[0]
        why = "" if missing else f" ({exc})"  # e.g. a library the module itself could not load
        note = _JETSON_NOTE if extra == "tensorrt" else ""
        raise MissingDependency(
            f"{module} is not installed{why}: {install_command(extra)}{note}"
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
