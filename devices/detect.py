"""Which device profile describes this machine.

Order: an explicit override (argument, then the ``TANDEM_DEVICE_PROFILE`` environment variable);
a Jetson, by the device-tree model string (``/proc/device-tree/model`` or
``/sys/firmware/devicetree/base/model``, disambiguated by ``MemTotal`` where NVIDIA sells one
module in two memory sizes); an NVIDIA GPU, by the driver (``nvidia-smi --query-gpu=name,
compute_cap,memory.total --format=csv,noheader``, with a timeout); else a generic CPU profile by
``platform.machine()``.

Every input is injectable (paths, the command runner, the machine name, the environment) so tests
feed the strings real machines print.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.devices.profiles import Profile, get_profile, load_profiles

__all__ = [
    "ENV_VAR",
    "Detection",
    "detect",
    "detect_profile",
    "profile_for_gpu",
    "profile_for_jetson_model",
]

ENV_VAR = "TANDEM_DEVICE_PROFILE"
MODEL_PATHS = ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")
MEMINFO_PATH = "/proc/meminfo"
NVIDIA_SMI = ("nvidia-smi", "--query-gpu=name,compute_cap,memory.total",
              "--format=csv,noheader")

Runner = Callable[[Sequence[str], float], str]


@dataclass(frozen=True)
class Detection:
    """The profile chosen and why: ``source`` is override|env|jetson|nvidia-smi|cpu."""

    profile: Profile
    source: str
    detail: str = ""


# (pattern on the device-tree model string, profile id or {memory-GiB threshold: id}).
# Checked in order: the specific names before the general ones.
_JETSON_MODELS: tuple[tuple[re.Pattern[str], str | tuple[tuple[float, str], ...]], ...] = (
    (re.compile(r"agx\s*orin", re.I),
     ((40.0, "jetson-agx-orin-64gb"), (0, "jetson-agx-orin-32gb"))),
    (re.compile(r"orin\s*nx", re.I), ((12.0, "jetson-orin-nx-16gb"), (0, "jetson-orin-nx-8gb"))),
    (re.compile(r"orin\s*nano", re.I),
     ((6.0, "jetson-orin-nano-8gb"), (0, "jetson-orin-nano-4gb"))),
    (re.compile(r"xavier\s*nx", re.I), "jetson-xavier-nx"),
    # The AGX Xavier developer kit reports just "Jetson-AGX".
    (re.compile(r"agx\s*xavier|jetson-agx\b", re.I), "jetson-agx-xavier"),
    (re.compile(r"\btx2\b|quill|storm|lightning", re.I), "jetson-tx2"),
    (re.compile(r"jetson\s*nano|p3448|p3450", re.I), "jetson-nano"),
)

# (pattern on the nvidia-smi name, profile id). Word boundaries keep "A10" from matching "A100".
_GPU_NAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bH200\b", re.I), "cloud-h200"),
    (re.compile(r"\bH100\b", re.I), "cloud-h100"),
    (re.compile(r"\bA100\b", re.I), "cloud-a100"),
    (re.compile(r"\bA10\b", re.I), "cloud-a10"),
    (re.compile(r"\bL4\b", re.I), "cloud-l4"),
    (re.compile(r"\bT4\b", re.I), "cloud-t4"),
)

_CPU_MACHINES = {
    "x86_64": "cpu-x86_64",
    "amd64": "cpu-x86_64",
    "aarch64": "cpu-arm64",
    "arm64": "cpu-arm64",
}


def _run(cmd: Sequence[str], timeout_s: float) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s,
                          check=True).stdout


def _mem_gib(meminfo: str | None) -> float | None:
    if not meminfo:
        return None
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.M)
    return int(m.group(1)) / (1024 * 1024) if m else None


def profile_for_jetson_model(model: str, meminfo: str | None = None) -> str | None:
    """Profile id for a device-tree model string (NUL-terminated as read), or None."""
    model = model.replace("\x00", " ").strip()
    gib = _mem_gib(meminfo)
    for pattern, target in _JETSON_MODELS:
        if not pattern.search(model):
            continue
        if isinstance(target, str):
            return target
        if gib is None:  # cannot tell the memory variant: the smaller one is the safe guess
            return target[-1][1]
        # MemTotal is a little under the module's memory (carve-outs), hence thresholds.
        return next(pid for threshold, pid in target if gib >= threshold)
    return None


def profile_for_gpu(name: str, compute_cap: str | None = None) -> str | None:
    """Profile id for an nvidia-smi GPU name (e.g. ``"NVIDIA H100 80GB HBM3"``), or None."""
    known = load_profiles()
    for pattern, pid in _GPU_NAMES:
        if pattern.search(name):
            cc = known[pid].compute_capability
            if compute_cap and cc and compute_cap.strip() != cc:
                return None  # the name matched but the hardware says otherwise
            return pid
    return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _smi_failure(exc: BaseException, timeout_s: float) -> str:
    """Why nvidia-smi told us nothing, in words (never a raw exception name)."""
    if isinstance(exc, FileNotFoundError):
        return "no NVIDIA driver (nvidia-smi not found)"
    if isinstance(exc, PermissionError):
        return "nvidia-smi is not executable here"
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"nvidia-smi did not answer within {timeout_s:g} s"
    if isinstance(exc, subprocess.CalledProcessError):
        said = (exc.stderr or exc.stdout or "").strip().splitlines()
        return f"nvidia-smi failed (exit {exc.returncode}{': ' + said[0] if said else ''})"
    return f"nvidia-smi could not run ({exc})"


def detect(
    override: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    model_paths: Sequence[str] = MODEL_PATHS,
    meminfo_path: str = MEMINFO_PATH,
    run: Runner | None = None,
    machine: str | None = None,
    timeout_s: float = 5.0,
) -> Detection:
    """Detect this machine's profile. An unknown override id raises NotFound (never guessed)."""
    if override:
        return Detection(get_profile(override), "override", override)
    env = os.environ if env is None else env
    if env.get(ENV_VAR):
        return Detection(get_profile(env[ENV_VAR]), "env", f"{ENV_VAR}={env[ENV_VAR]}")

    for path in model_paths:
        model = _read(path)
        if model is None:
            continue
        pid = profile_for_jetson_model(model, _read(meminfo_path))
        if pid:
            return Detection(get_profile(pid), "jetson", model.replace("\x00", "").strip())

    run = run or _run
    notes = []
    try:
        out = run(NVIDIA_SMI, timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:  # no driver, no GPU, or it hung
        notes.append(_smi_failure(exc, timeout_s))
    else:
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if not parts[0]:
                continue
            pid = profile_for_gpu(parts[0], parts[1] if len(parts) > 1 else None)
            if pid:
                return Detection(get_profile(pid), "nvidia-smi", line.strip())
            notes.append(f"no profile for GPU {line.strip()!r}")
            break  # device 0 decides; an unknown GPU falls back to the CPU profile

    arch = (machine or platform.machine()).lower()
    pid = _CPU_MACHINES.get(arch, "cpu-arm64" if arch.startswith("arm") else "cpu-x86_64")
    notes.insert(0, f"platform.machine()={arch}")
    return Detection(get_profile(pid), "cpu", "; ".join(notes))


def detect_profile(override: str | None = None, **kwargs) -> Profile:
    """The profile of this machine (see :func:`detect` for the order and the injectable inputs)."""
    return detect(override, **kwargs).profile
