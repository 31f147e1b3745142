import subprocess

import pytest

from tandem.devices.detect import ENV_VAR, detect, profile_for_gpu, profile_for_jetson_model
from tandem.protocol.errors import NotFound

MEMINFO = "MemTotal:       {kb} kB\nMemFree:         1000 kB\n"


def _no_gpu(cmd, timeout_s):
    raise FileNotFoundError("nvidia-smi")


def _smi(output):
    calls = []

    def run(cmd, timeout_s):
        calls.append((tuple(cmd), timeout_s))
        return output

    run.calls = calls
    return run


@pytest.mark.parametrize("model,kb,expected", [
    ("NVIDIA Jetson Nano Developer Kit\x00", 4059712, "jetson-nano"),
    ("quill\x00", 8034088, "jetson-tx2"),
    ("NVIDIA Jetson Xavier NX Developer Kit\x00", 7773600, "jetson-xavier-nx"),
    ("Jetson-AGX\x00", 32527264, "jetson-agx-xavier"),
    ("NVIDIA Jetson AGX Orin Developer Kit\x00", 64335836, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson AGX Orin\x00", 31536000, "jetson-agx-orin-32gb"),
    ("NVIDIA Jetson Orin Nano Developer Kit\x00", 7801536, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano Developer Kit\x00", 3700000, "jetson-orin-nano-4gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00", 15941688,
     "jetson-orin-nx-16gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00", 7620000,
     "jetson-orin-nx-8gb"),
])
def test_jetson_model_strings(tmp_path, model, kb, expected):
    (tmp_path / "model").write_bytes(model.encode())
    (tmp_path / "meminfo").write_text(MEMINFO.format(kb=kb))
    d = detect(env={}, model_paths=[str(tmp_path / "missing"), str(tmp_path / "model")],
               meminfo_path=str(tmp_path / "meminfo"), run=_no_gpu)
    assert (d.profile.id, d.source) == (expected, "jetson")


def test_unknown_devicetree_model_falls_through_to_cpu(tmp_path):
    (tmp_path / "model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    d = detect(env={}, model_paths=[str(tmp_path / "model")], run=_no_gpu, machine="aarch64")
    assert (d.profile.id, d.source) == ("cpu-arm64", "cpu")


@pytest.mark.parametrize("line,expected", [
    ("NVIDIA H100 80GB HBM3, 9.0, 81559 MiB", "cloud-h100"),
    ("NVIDIA H200, 9.0, 143771 MiB", "cloud-h200"),
    ("NVIDIA A100-SXM4-80GB, 8.0, 81920 MiB", "cloud-a100"),
    ("NVIDIA A10, 8.6, 23028 MiB", "cloud-a10"),
    ("NVIDIA L4, 8.9, 23034 MiB", "cloud-l4"),
    ("Tesla T4, 7.5, 15360 MiB", "cloud-t4"),
])
def test_nvidia_smi_lines(line, expected):
    run = _smi(line + "\n" + line + "\n")  # two GPUs: device 0 decides
    d = detect(env={}, model_paths=[], run=run, timeout_s=2.5)
    assert (d.profile.id, d.source) == (expected, "nvidia-smi")
    assert run.calls[0][0][0] == "nvidia-smi" and run.calls[0][1] == 2.5
    assert "--query-gpu=name,compute_cap,memory.total" in run.calls[0][0]


def test_gpu_name_with_contradicting_compute_capability_is_not_trusted():
    assert profile_for_gpu("NVIDIA A10", "8.0") is None
    assert profile_for_gpu("NVIDIA GeForce RTX 4090", "8.9") is None


def test_unknown_gpu_falls_back_to_cpu_and_says_why():
    d = detect(env={}, model_paths=[], run=_smi("NVIDIA GeForce RTX 4090, 8.9, 24564 MiB\n"),
               machine="x86_64")
    assert d.profile.id == "cpu-x86_64" and "RTX 4090" in d.detail


def test_nvidia_smi_timeout_falls_back_to_cpu():
    def hang(cmd, timeout_s):
        raise subprocess.TimeoutExpired(cmd, timeout_s)

    d = detect(env={}, model_paths=[], run=hang, machine="AMD64")
    assert d.profile.id == "cpu-x86_64" and "nvidia-smi did not answer within 5 s" in d.detail


@pytest.mark.parametrize("exc, words", [
    (FileNotFoundError(2, "No such file or directory", "nvidia-smi"),
     "no NVIDIA driver (nvidia-smi not found)"),
    (PermissionError(13, "Permission denied", "nvidia-smi"), "nvidia-smi is not executable"),
    (subprocess.CalledProcessError(9, ["nvidia-smi"], "", "NVIDIA-SMI has failed because it "
                                   "couldn't communicate with the NVIDIA driver.\n"),
     "nvidia-smi failed (exit 9: NVIDIA-SMI has failed because it couldn't communicate"),
])
def test_nvidia_smi_failures_are_said_in_words(exc, words):
    def fail(cmd, timeout_s):
        raise exc

    d = detect(env={}, model_paths=[], run=fail, machine="x86_64")
    assert d.profile.id == "cpu-x86_64" and words in d.detail
    assert type(exc).__name__ not in d.detail


def test_override_argument_then_env_win():
    assert detect("cloud-l4", env={ENV_VAR: "cloud-t4"}).source == "override"
    d = detect(env={ENV_VAR: "cloud-t4"}, model_paths=[], run=_no_gpu)
    assert (d.profile.id, d.source) == ("cloud-t4", "env")
    with pytest.raises(NotFound):
        detect(env={ENV_VAR: "cloud-x9000"})


def test_jetson_model_helper_without_meminfo_picks_the_smaller_variant():
    assert profile_for_jetson_model("NVIDIA Jetson AGX Orin") == "jetson-agx-orin-32gb"
    assert profile_for_jetson_model("Something else") is None
