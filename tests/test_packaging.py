"""Packaging rules: light imports, small public surfaces, and a CLI that works without extras.

Each check runs in a fresh interpreter where the heavy optional libraries are made unimportable,
as on a core-only install (Polygraphy's dependency test does the same).
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["protocol", "devices", "compiler", "edge", "cloud"]
HEAVY = ["onnx", "onnxruntime", "tensorrt", "pycuda", "zeroconf", "torch"]

BLOCKER = textwrap.dedent(
    f"""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ImportError(f"No module named {{name!r}} (blocked by test)")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def _all_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        module = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{pkg}."):
            names.append(info.name)
    return names


def test_every_module_imports_without_heavy_extras():
    modules = _all_modules()
    proc = _run(
        f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        assert not loaded, loaded
        """
    )
    assert proc.returncode == 0, proc.stderr


def test_importing_protocol_loads_nothing_heavy():
    # Not even blocked: a plain interpreter must not pull onnx/ORT in through `import protocol`.
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys, protocol, devices, compiler, edge, cloud;"
         f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_public_surface_is_declared_and_exists(pkg):
    module = importlib.import_module(pkg)
    assert isinstance(module.__all__, list | tuple)
    for name in module.__all__:
        assert hasattr(module, name), f"{pkg}.__all__ names missing {name}"
    public = {n for n in vars(module) if not n.startswith("_")}
    submodules = {m.name for m in pkgutil.iter_modules(module.__path__)}
    undeclared = public - set(module.__all__) - submodules - {"annotations"}
    assert not undeclared, f"{pkg} exposes names outside __all__: {sorted(undeclared)}"


def _cli_commands() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group="tandem.commands"))


def test_every_help_works_without_extras():
    commands = _cli_commands()
    assert {"compile", "inspect", "devices"} <= set(commands)
    proc = _run(
        f"""
        from protocol._cli import main
        for args in [["--help"]] + [[c, "--help"] for c in {commands!r}]:
            rc = main(args)
            assert rc == 0, (args, rc)
        """
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_command_needing_missing_extra_names_the_extra(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really onnx")
    proc = _run(
        f"""
        import sys
        from protocol._cli import main
        sys.exit(main(["compile", {str(model)!r}, "-t", "onnxruntime", "-o",
                       {str(tmp_path / "out")!r}]))
        """
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "tandem-rt[cpu]" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bench_runs_a_benchmark_from_the_checkout_and_refuses_unknown(tmp_path, monkeypatch,
                                                                        capsys):
    from protocol._cli import main

    monkeypatch.chdir(ROOT)
    assert main(["bench", "no_such_bench"]) == 1
    assert "no benchmark 'no_such_bench'" in capsys.readouterr().err
    assert main(["bench", "_common"]) == 2  # private modules are not benchmarks


def test_a_failing_benchmark_fails_the_command(tmp_path, monkeypatch):
    from protocol._cli import main

    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "failing.py").write_text("def main(argv):\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "benchmarks", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["bench", "failing"]) == 3
