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
FOLDERS = ["protocol", "devices", "compiler", "edge", "cloud", "lab"]
PACKAGES = ["tandem"] + [f"tandem.{f}" for f in FOLDERS]
HEAVY = ["onnx", "onnxruntime", "tensorrt", "pycuda", "zeroconf", "torch", "nats", "aiohttp",
         "psycopg"]

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
         "import sys, tandem.protocol, tandem.devices, tandem.compiler, tandem.edge, tandem.cloud;"
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
    loaded = {n for n in public if f"{pkg}.{n}" in sys.modules}
    undeclared = public - set(module.__all__) - submodules - loaded - {"annotations"}
    assert not undeclared, f"{pkg} exposes names outside __all__: {sorted(undeclared)}"


def _cli_commands() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group="tandem.commands"))


def test_every_help_works_without_extras():
    commands = _cli_commands()
    assert {"compile", "inspect", "devices"} <= set(commands)
    proc = _run(
        f"""
        from tandem.cli import main
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
        from tandem.cli import main
        sys.exit(main(["compile", {str(model)!r}, "-t", "onnxruntime", "-o",
                       {str(tmp_path / "out")!r}]))
        """
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    from tandem.protocol.lazy import install_command

    assert install_command("cpu") in proc.stderr  # a command that works for this install
    assert not (tmp_path / "out").exists()


def test_bench_runs_a_benchmark_from_the_checkout_and_refuses_unknown(tmp_path, monkeypatch,
                                                                        capsys):
    from tandem.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["bench", "no_such_bench"]) == 1
    assert "no benchmark 'no_such_bench'" in capsys.readouterr().err
    assert main(["bench", "_common"]) == 2  # private modules are not benchmarks


def test_a_failing_benchmark_fails_the_command(tmp_path, monkeypatch):
    from tandem.cli import main

    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "failing.py").write_text("def main(argv):\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "benchmarks", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["bench", "failing"]) == 3


def _imports_of(path: Path) -> list[str]:
    """Every module a file imports (absolute names; relative ones resolved), TYPE_CHECKING too."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    here = ["tandem", *parts] if parts[0] in FOLDERS else parts
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + (1 if path.name == "__init__.py" else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            # ``from pkg import _sub`` imports the submodule; ``from pkg import Name`` (any name
            # that is not a module of ours) imports pkg itself, its __init__ included
            if not all(_is_our_module(sub) for sub in subs):
                names.append(mod)
            names += subs
    return names


def _is_our_module(dotted: str) -> bool:
    """Whether a dotted name is a module or package of this repository (installed layout)."""
    parts = dotted.split(".")
    if parts[0] != "tandem" or len(parts) < 2:
        return False
    rel = parts[1:] if parts[1] in FOLDERS else ["tandem", *parts[1:]]
    base = ROOT.joinpath(*rel)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _package_files():
    for folder in ["tandem", *FOLDERS]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield folder, path


def test_one_import_root_from_outside_the_checkout(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c",
         "import importlib.util as u, tandem.protocol, tandem.devices, tandem.compiler, "
         "tandem.edge, tandem.cloud, tandem.cli;"
         f"print([n for n in {FOLDERS!r} if u.find_spec(n) is not None])"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # `import protocol` (and the others) does not work


def test_pyproject_lists_every_package_folder():
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = conf["package-dir"]
    assert mapping == {"tandem": "tandem", **{f"tandem.{f}": f for f in FOLDERS}}
    found = set()
    for folder in ["tandem", *FOLDERS]:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join(["tandem", *([folder] if folder != "tandem" else []), *rel]))
    assert set(conf["packages"]) == found


def test_no_module_imports_another_packages_private_module():
    offenders = []
    for folder, path in _package_files():
        for name in _imports_of(path):
            parts = name.split(".")
            if parts[0] != "tandem" or len(parts) < 3:
                continue
            owner = parts[1]
            private = any(p.startswith("_") and p != "__init__" for p in parts[2:])
            if owner != folder and private:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


_MAY_IMPORT = {
    "protocol": set(),
    "devices": {"protocol"},
    "compiler": {"protocol", "devices"},
    "edge": {"protocol", "devices", "compiler"},
    "cloud": {"protocol", "devices", "compiler"},
    "lab": {"protocol", "devices", "compiler", "edge", "cloud"},
}


def test_dependencies_flow_one_way():
    offenders = []
    for folder, path in _package_files():
        if folder == "tandem":
            continue
        for name in _imports_of(path):
            parts = name.split(".")
            if parts[0] == "tandem" and len(parts) > 1 and parts[1] in FOLDERS \
                    and parts[1] != folder and parts[1] not in _MAY_IMPORT[folder]:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_no_import_cycle_between_modules_of_a_package():
    """Within each package, the module import graph (TYPE_CHECKING imports included) is acyclic;
    importing a package's own ``__init__`` from one of its modules counts too."""
    graph: dict[str, set[str]] = {}
    modules = {}
    for folder, path in _package_files():
        rel = path.relative_to(ROOT / folder).with_suffix("").parts
        if rel[-1] == "__init__":
            rel = rel[:-1]
        name = ".".join(["tandem", *([folder] if folder != "tandem" else []), *rel])
        modules[name] = path
    for name, path in modules.items():
        deps = set()
        for imported in _imports_of(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                deps.add(imported)
        graph[name] = deps
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
