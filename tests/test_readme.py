"""The README stays true: its compile line and its Python example run as written in a fresh copy of
the repository and leave it clean, its test command is the one .ci/run runs, and it (and the
architecture document) link only to files inside the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _command_after(comment: str) -> str:
    match = re.search(rf"^# {re.escape(comment)}[^\n]*\n(?P<cmd>[^\n]+)$", README, re.MULTILINE)
    assert match, f"README has no '# {comment}' line followed by a command"
    return match.group("cmd")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("TANDEM_DEBUG", None)
    env.update(extra)
    return env


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh repository holding this checkout's files as they are now (tracked and new, not
    ignored), committed: what a new user has after ``git clone``."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path_factory.mktemp("clone") / "tandem"
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True,
                           timeout=60).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=readme", "-c", "user.email=readme@localhost", "commit", "-qm",
         "snapshot")
    assert _git(repo, "status", "--porcelain") == ""
    return repo


def test_compile_line_runs_as_written_and_leaves_the_clone_clean(clone):
    # (the main job, tandem demo, is run as written by tests/lab/test_demo.py)
    cmd = _command_after("compile")
    for run in (1, 2):  # and again: --overwrite replaces what the first run wrote
        proc = subprocess.run(["bash", "-c", f"set -e; {cmd}"], cwd=clone, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"run {run}: {proc.stdout}{proc.stderr}"
        assert "Traceback" not in proc.stderr
        assert "unsigned" in proc.stdout  # the inspect summary
    assert (clone / "out" / "bundle" / "manifest.json").is_file()
    assert _git(clone, "status", "--porcelain") == ""


def test_quick_benchmark_runs_never_rewrite_the_results_of_record(clone):
    # Every benchmark parses its arguments with benchmarks._common.parser and writes with
    # write_json, where the rule lives; one real quick run (backend: the fastest) shows it.
    for path in sorted((clone / "benchmarks").glob("[!_]*.py")):
        source = path.read_text()
        if "def main(" in source:
            assert "parser(" in source and "write_json(" in source, path.name
    records = {p.name: p.read_bytes() for p in (clone / "benchmarks" / "results").glob("*.json")}
    assert {"compile.json", "backend.json"} <= set(records)
    proc = subprocess.run(["tandem", "bench", "backend", "--quick"], cwd=clone, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: a target missed (noise)
    assert "out/benchmarks/backend.json" in proc.stdout
    assert (clone / "out" / "benchmarks" / "backend.json").is_file()
    assert {p.name: p.read_bytes() for p in (clone / "benchmarks" / "results").glob("*.json")} \
        == records
    assert _git(clone, "status", "--porcelain") == ""
    for name in ("compile", "backend"):  # pointing a quick run at a record is refused up front
        proc = subprocess.run(["tandem", "bench", name, "--quick", "--json",
                               f"benchmarks/results/{name}.json"], cwd=clone, env=_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "not a result of record" in proc.stderr
    assert {p.name: p.read_bytes() for p in (clone / "benchmarks" / "results").glob("*.json")} \
        == records


def test_what_the_setup_and_tests_create_is_ignored(clone):
    # The set-up line makes a virtual environment and an editable install's metadata; the tests
    # leave caches: none of it may show up as a change.
    made = [".venv/bin/python", "tandem_rt.egg-info/PKG-INFO", "build/lib/x.py",
            ".pytest_cache/v/x", ".hypothesis/x", "protocol/__pycache__/x.pyc",
            ".ruff_cache/x", "out/anything"]
    ignored = subprocess.run(["git", "-C", str(clone), "check-ignore", *made],
                             capture_output=True, text=True, timeout=60).stdout.split()
    assert sorted(ignored) == sorted(made)


def test_python_example_runs_as_written(clone, mosquitto, tmp_path):
    """The README's Python block, unchanged, after the compile line, against a real broker and a
    responder that really runs the tails; the result equals the whole model's."""
    from tandem.devices.backends import OnnxRuntimeBackend
    from tandem.protocol import (
        InferenceResponse,
        MqttTransport,
        SyncTransport,
        Tensor,
        TransportConfig,
        load_bundle,
    )

    block = re.search(r"```python\n(?P<code>.*?)```", README, re.DOTALL)
    assert block, "README has no Python example"
    if not (clone / "out" / "model.onnx").exists():  # the compile line, if not run yet
        subprocess.run(["bash", "-c", _command_after("compile")], cwd=clone, env=_env(),
                       check=True, capture_output=True, timeout=300)
    script = tmp_path / "example.py"  # outside the clone: the clone must stay clean
    script.write_text(block.group("code") + (
        "\nwith OnnxRuntimeBackend('out/model.onnx') as full:\n"
        "    expected = full.infer({m.inputs[0].name: image})\n"
        "assert response.worker_id == 'readme', response\n"
        "assert {t.name for t in response.outputs} == set(expected)\n"
        "for t in response.outputs:\n"
        "    np.testing.assert_allclose(t.to_array(), expected[t.name], rtol=1e-4, atol=1e-5)\n"
    ))

    # The cloud side, loaded before the example runs (its request has a 200 ms budget): the
    # tails of the compile line's bundle (the example compiles the same model, so the same cuts).
    with load_bundle(clone / "out" / "bundle") as bundle:
        digest = bundle.manifest.source_digest
        tails = {c.id: OnnxRuntimeBackend(bundle.path_of(c.tail_part)).activate()
                 for c in bundle.manifest.cuts if c.tail_part}

    def serve_tail(req, ctx):
        assert req.model_digest == digest
        outs = tails[req.cut_id].infer({t.name: t.to_array() for t in req.tensors})
        return InferenceResponse(id=req.id, worker_id="readme", outputs=tuple(
            Tensor.from_array(k, v) for k, v in outs.items()))

    try:
        with SyncTransport(MqttTransport(TransportConfig(host=mosquitto.host,
                                                         port=mosquitto.port))) as cloud:
            cloud.serve("tandem/v1/req/+/+", serve_tail)
            proc = subprocess.run([sys.executable, str(script)], cwd=clone, capture_output=True,
                                  text=True, timeout=120,
                                  env=_env(MQTT_PORT=str(mosquitto.port)))
    finally:
        for tail in tails.values():
            tail.deactivate()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "raw" in proc.stdout  # the allowed encodings it prints
    assert _git(clone, "status", "--porcelain") == ""


def test_ci_runs_the_readme_test_command():
    cmd = _command_after("tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmd in ci, f"README test command {cmd!r} is not what .ci/run runs"


def test_setup_installs_what_ci_installs():
    extra = "-e '.[dev]'"
    assert extra in _command_after("set up")
    assert extra in (ROOT / ".ci" / "run").read_text()


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_links_stay_inside_the_repository(doc):
    path = ROOT / doc
    text = path.read_text()
    assert "../shared" not in text and "/work/" not in text
    links = _links(text)
    assert links, f"{doc} links to nothing"
    for target in links:
        assert "://" not in target and not target.startswith("/"), f"{doc}: {target}"
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{doc}: {target}"


def test_the_architecture_document_names_every_package_and_command():
    """Kept current: a new package or command that docs/architecture.md does not name fails."""
    from importlib.metadata import entry_points

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library >= 3.11")
    text = ARCHITECTURE.read_text()
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in conf["packages"]:
        folder = conf["package-dir"].get(package)
        if folder is None:  # a subpackage: tandem.protocol.bundle lives in protocol/bundle/
            owner = max((p for p in conf["package-dir"] if package.startswith(p + ".")), key=len)
            folder = conf["package-dir"][owner] + "/" + package[len(owner) + 1:].replace(".", "/")
        assert f"`{folder}/`" in text, f"docs/architecture.md does not describe {folder}/"
    for ep in entry_points(group="tandem.commands"):
        assert f"tandem {ep.name}" in text, f"docs/architecture.md does not name tandem {ep.name}"
    assert "set_tcp_nodelay true" in text and "planned" in text
