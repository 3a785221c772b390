"""The machine and software that a set of numbers belongs to."""

import os
import platform
import re
import shutil
import subprocess
from importlib import metadata as package_metadata

PACKAGES = ("torch", "onnx", "onnxruntime-gpu", "onnxconverter-common", "numpy", "pillow",
            "fastapi", "uvicorn", "httptools", "uvloop", "httpx")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD extensions that decide int8 and fp32 kernel speed in ONNX Runtime."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in wanted if f in flags]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu() -> dict:
    """The NVIDIA GPU(s) nvidia-smi reports, or why there are none."""
    if shutil.which("nvidia-smi") is None:
        return {"present": False, "reason": "no nvidia-smi on this machine: no NVIDIA GPU or driver"}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"present": False, "reason": f"nvidia-smi failed: {exc}"}
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return {"present": bool(names), "devices": names} if names else \
        {"present": False, "reason": "nvidia-smi lists no GPU"}


def slug() -> str:
    """A file-name-safe name for this kind of machine: CPU model and core count."""
    name = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    return f"{name}-{cores()}c"


def describe() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": cpu_model(), "cores": cores(), "cpu_flags": cpu_flags(), "gpu": gpu(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), "packages": versions}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
