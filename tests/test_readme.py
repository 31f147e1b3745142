"""The README's commands stay true: the main-job line runs as written, and the test command is the
one .ci/run runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command_after(comment: str) -> str:
    match = re.search(rf"^# {re.escape(comment)}[^\n]*\n(?P<cmd>[^\n]+)$", README, re.MULTILINE)
    assert match, f"README has no '# {comment}' line followed by a command"
    return match.group("cmd")


def test_main_job_command_runs_as_written(tmp_path):
    cmd = _command_after("main job")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-c", f"set -e; {cmd}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert "signature" in proc.stdout or "unsigned" in proc.stdout  # the inspect summary


def test_ci_runs_the_readme_test_command():
    cmd = _command_after("tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmd in ci, f"README test command {cmd!r} is not what .ci/run runs"


def test_setup_installs_what_ci_installs():
    extra = "-e '.[dev]'"
    assert extra in _command_after("set up")
    assert extra in (ROOT / ".ci" / "run").read_text()


def test_python_example_runs(tmp_path, mosquitto):
    from tandem.compiler.examples import cnn_chain, save
    from tandem.protocol import InferenceResponse, MqttTransport, SyncTransport, TransportConfig

    block = re.search(r"```python\n(?P<code>.*?)```", README, re.DOTALL)
    assert block, "README has no Python example"
    code = block.group("code").replace("port=1883", f"port={mosquitto.port}")
    script = tmp_path / "example.py"
    script.write_text(
        "import numpy as np\nfeatures = np.ones((1, 8), np.float32)  # the reader's tensor\n"
        + code + "\nassert response.worker_id == 'readme', response\n"
        "assert result.manifest.source_digest == bundle.manifest.source_digest\n"
    )
    save(cnn_chain(), tmp_path / "model.onnx")
    with SyncTransport(MqttTransport(TransportConfig(host=mosquitto.host,
                                                     port=mosquitto.port))) as cloud:
        cloud.serve("tandem/v1/req/+/+", lambda req, ctx: InferenceResponse(
            id=req.id, outputs=req.tensors, worker_id="readme"))
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)  # the installed package, not the checkout
    assert proc.returncode == 0, proc.stdout + proc.stderr
