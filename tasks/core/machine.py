"""What a measurement ran on: CPU model, the ISA extensions that decide INT8/FP32 speed, runtime
versions and thread counts.

Speed-up ratios differ between machines (an INT8 QDQ model pays on AVX-512 VNNI or AMX, barely on
AVX2 alone), so every benchmark prints :func:`machine_line` at the top and stores
:func:`machine_info` in its JSON output. Nothing is imported to find a version (an import of torch
takes seconds and changes thread settings): versions come from the installed package metadata,
thread counts from the modules only when the caller already imported them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# ISA extensions reported, in /proc/cpuinfo spelling: name shown -> flag.
ISA_FLAGS: dict[str, str] = {
    "AVX2": "avx2",
    "AVX-512F": "avx512f",
    "AVX512_VNNI": "avx512_vnni",
    "AVX_VNNI": "avx_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
    "AMX_BF16": "amx_bf16",
}
RUNTIMES = ("torch", "onnxruntime", "openvino", "ultralytics", "onnx")
# The inference runtimes' thread count when the caller names none (tasks/serving/backends.py: default_threads);
# each Ray task sets it to its CPUs: two ORT pools of 2 threads on 2 vCPUs wait on each other
INFER_THREADS_ENV = "DAMAGE_INFER_THREADS"
# Variables every numeric library (and this project's torch and inference set-up) reads for its pool size: set
# in each Ray worker before the library starts (tasks/scale/ray_runtime.py), reported by machine_info
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "DAMAGE_TORCH_THREADS",
              INFER_THREADS_ENV)


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model and ISA extensions from the text of ``/proc/cpuinfo`` (x86 ``flags`` or Arm ``Features``).

    Returns:
        ``{"model": str, "isa": {name: bool for each of ISA_FLAGS}, "logical_cpus": int,
        "physical_cores": int | None}``; ``physical_cores`` counts distinct (physical id, core id)
        pairs and is None when the text does not give them.

    Example:
        >>> parse_cpuinfo("model name : Foo\\nflags : fpu avx2 avx512f\\n")["isa"]["AVX-512F"]
        True
    """
    model, flags, logical = "unknown", set(), 0
    cores: set[tuple[str, str]] = set()
    phys = core = None
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if not sep:
            phys = core = None  # blank line: next processor block
            continue
        key, val = key.strip(), val.strip()
        if key == "processor":
            logical += 1
        elif key in ("model name", "Model", "Hardware") and model == "unknown" and val:
            model = val
        elif key in ("flags", "Features") and not flags:
            flags = set(val.split())
        elif key == "physical id":
            phys = val
        elif key == "core id":
            core = val
        if phys is not None and core is not None:
            cores.add((phys, core))
            phys = core = None
    return {"model": model, "isa": {name: flag in flags for name, flag in ISA_FLAGS.items()},
            "logical_cpus": logical, "physical_cores": len(cores) or None}


def version_info(dist: str) -> str | None:
    """Installed version of ``dist`` when its module is importable (found, not imported), else None."""
    try:
        if importlib.util.find_spec(dist) is None:
            return None
        return metadata.version(dist)
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return None


def thread_counts(extra: dict[str, int] | None = None) -> dict[str, Any]:
    """Thread settings in force: env variables, torch's intra-op count if torch is already imported,
    and what the caller gives in ``extra`` (e.g. ``{"ort_intra_op": 2}``)."""
    out: dict[str, Any] = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        out["torch"] = int(torch.get_num_threads())
    out.update(extra or {})
    return out


def machine_info(threads: dict[str, int] | None = None, cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU, ISA, runtime versions and thread counts of this process, as a JSON-ready dict.

    Args:
        threads: thread counts the caller chose (merged into ``threads``).
        cpuinfo: path of the cpuinfo text (a missing file gives model 'unknown', no ISA).
    """
    try:
        cpu = parse_cpuinfo(Path(cpuinfo).read_text())
    except OSError:
        cpu = parse_cpuinfo("")
    if cpu["model"] == "unknown":
        cpu["model"] = platform.processor() or platform.machine() or "unknown"
    return {"cpu": cpu["model"], "arch": platform.machine(), "isa": cpu["isa"],
            "logical_cpus": cpu["logical_cpus"] or os.cpu_count(), "physical_cores": cpu["physical_cores"],
            "python": platform.python_version(),
            "runtimes": {name: v for name in RUNTIMES if (v := version_info(name)) is not None},
            "threads": thread_counts(threads)}


def machine_line(info: dict[str, Any]) -> str:
    """Two printable lines: ``cpu ... | isa AVX2 AVX-512F ... (no AMX_INT8 ...)`` and runtimes + threads."""
    have = [k for k, v in info["isa"].items() if v]
    lack = [k for k, v in info["isa"].items() if not v]
    isa = " ".join(have) or "none"
    if lack:
        isa += f" (no {' '.join(lack)})"
    cores = f"{info['logical_cpus']} logical / {info['physical_cores'] or '?'} physical cores"
    runtimes = " ".join(f"{k} {v}" for k, v in info["runtimes"].items())
    threads = " ".join(f"{k}={v}" for k, v in info["threads"].items()) or "defaults"
    return f"cpu {info['cpu']} ({info['arch']}, {cores}) | isa {isa}\nruntimes {runtimes} | threads {threads}"
