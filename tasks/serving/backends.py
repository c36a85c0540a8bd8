"""The predictor's inference runtimes: ONNX Runtime (always installed) and OpenVINO (optional).

Both read the same ``.onnx`` files (FP32 and QDQ INT8) and give the same two outputs; the
predictor only ever calls ``Runtime.run(batch) -> (detections, prototypes)``. Torch-free:
numpy, ONNX Runtime, OpenVINO (imported only when chosen) and the standard library.

Choosing (``resolve_backend``), as ``predictor.backend`` in the config says:

* ``onnxruntime`` / ``openvino``: that runtime; ``openvino`` when the package is not installed
  is a ``DamageError`` (``pip install 'damage[openvino]'``);
* ``auto``: the runtime the export measured fastest on its machine (``damage.preferred_backend``
  in the ONNX metadata, written by ``damage.tasks.export.onnx.record_backend_latency``); without that
  key, or when it was measured on a CPU with another ISA (``damage.backend_cpu``), ONNX Runtime. When the preferred runtime is OpenVINO and it is not installed, one line
  is logged (once per process) and ONNX Runtime runs: never a crash.

ONNX Runtime session settings (compared one by one in ``bench/bench_predictor.py``): intra-op threads = physical cores (a hyper-thread sibling shares the core's FMA units, so it
adds scheduling cost and no throughput), spinning on (the worker threads busy-wait between the
graph's many small ops instead of sleeping and waking) and stopped when a run returns
(``session.force_spinning_stop``: left spinning after the run, they compete with what the caller
does next; on two cores, 2026-11-30, a busy image's post-processing right after the run took 15.7
instead of 14.5 ms, and 25-33 instead of 14 ms while it still ran threaded BLAS products, and the
bare session.run was no slower), every graph optimisation on, and the
optimised graph cached next to the ONNX (``optimized_cache_path``): the name carries the ORT
version, the CPU's ISA and a hash of the file, so an edited model, an upgraded runtime or a
copy on another CPU (the NCHWc layout ORT picks depends on the vector width) never reads a
stale cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from ..core.atomic import atomic_write
from ..core.errors import DamageError
from ..core.machine import INFER_THREADS_ENV
from ..core.quiet import quiet_openvino

__all__ = ["BACKENDS", "RUNTIMES", "OnnxRuntime", "OpenVinoRuntime", "Runtime", "cpu_isa", "open_runtime",
           "openvino_available", "physical_cores", "raw_metadata", "resolve_backend", "warn_openvino_missing"]

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino")  # what can run a model
BACKENDS = ("auto", *RUNTIMES)  # what may be asked for
OPENVINO_MISSING = "OpenVINO is not installed (pip install 'damage[openvino]'): using ONNX Runtime"
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # the ones that change kernels
# <name>.onnx -> <name>.onnx.ortopt-<key>: not *.onnx, so a glob for models never picks a cache up
CACHE_TAG = ".ortopt-"


# ----------------------------------------------------------------------------- machine


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def default_threads() -> int:
    """Inference threads when the caller names none: ``DAMAGE_INFER_THREADS`` when set (a Ray task's CPUs), else
    ``physical_cores()``."""
    raw = os.environ.get(INFER_THREADS_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else physical_cores()


@functools.cache
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once), at least 1.

    Counts distinct (physical id, core id) pairs in ``/proc/cpuinfo`` among the CPUs of this
    process's affinity mask; elsewhere (no procfs) the logical count.
    """
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores, cpu, phys = set(), None, "0"
    for line in _cpuinfo().splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "processor":
            cpu, phys = int(val), "0"
        elif key == "physical id":
            phys = val
        elif key == "core id" and cpu in allowed:
            cores.add((phys, val))
    return max(len(cores) if cores else len(allowed), 1)


@functools.cache
def cpu_isa() -> str:
    """The vector ISA flags that change which kernels the runtimes pick, e.g. ``avx2+avx512f+amx_int8``."""
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return "+".join(f for f in ISA_FLAGS if f in flags) or "generic"


# ----------------------------------------------------------------------------- OpenVINO presence


@functools.cache
def openvino_available() -> bool:
    """True when the ``openvino`` package imports (it is an optional extra). Its telemetry is blocked first."""
    quiet_openvino()
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def warn_openvino_missing() -> None:
    """Log that OpenVINO is missing and ONNX Runtime runs instead: one line, once per process."""
    log.warning(OPENVINO_MISSING)


def resolve_backend(requested: str, metadata: dict[str, Any], path: Path | str = "model") -> str:
    """The runtime to use: ``onnxruntime`` or ``openvino`` (see the module doc for the rules).

    Args:
        requested: ``auto``, ``onnxruntime`` or ``openvino``.
        metadata: the model's decoded metadata (``damage.preferred_backend`` is read).
        path: the model, for messages.

    Raises:
        DamageError: an unknown backend, or ``openvino`` asked for explicitly and not installed.

    Example:
        >>> resolve_backend("auto", {})
        'onnxruntime'
    """
    if requested not in BACKENDS:
        raise DamageError(f"{path}: unknown predictor backend {requested!r} (expected one of {', '.join(BACKENDS)})")
    if requested == "openvino" and not openvino_available():
        raise DamageError(f"{path}: predictor backend 'openvino' asked for, but OpenVINO is not installed "
                          f"(pip install 'damage[openvino]', or use backend onnxruntime/auto)")
    if requested != "auto":
        return requested
    preferred = metadata.get("damage.preferred_backend")
    measured_on = metadata.get("damage.backend_cpu")
    if measured_on is not None and measured_on != cpu_isa():
        return "onnxruntime"  # measured on a CPU with other kernels: the ranking may not hold here
    if preferred == "openvino":
        if openvino_available():
            return "openvino"
        warn_openvino_missing()
    return "onnxruntime"


# ----------------------------------------------------------------------------- runtimes


class Runtime(Protocol):
    """What the predictor needs from a runtime."""

    name: str
    input_shape: list[int | None]  # NCHW, None = dynamic
    output_shapes: list[list[int | None]]  # the first two outputs, None = dynamic

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(detections, prototypes) of an NCHW float32 batch."""
        ...


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def optimized_cache_path(path: Path) -> Path:
    """Where ORT's optimised graph of ``path`` is cached: beside it, keyed by ORT version, ISA and file hash."""
    key = hashlib.sha256(f"{ort.__version__}|{cpu_isa()}|{_file_hash(path)}".encode()).hexdigest()[:16]
    return path.with_name(f"{path.name}{CACHE_TAG}{key}")


def _dims(shape) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in shape]


class OnnxRuntime:
    """ONNX Runtime CPU session with the tuned options (module doc).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (None: ``default_threads()``).
        providers: execution providers (default CPU).
        spinning: let idle worker threads spin between ops (lower latency, busier cores).
        spin_stop: with ``spinning``, the workers stop spinning when ``run`` returns
            (``session.force_spinning_stop``), so they leave the cores to the caller's post-processing.
        cache: read/write the optimised graph next to the model (skipped where the folder is
            read-only); False = optimise in memory each time.

    Raises:
        DamageError: not a loadable ONNX model.
    """

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None,
                 spinning: bool = True, cache: bool = True, spin_stop: bool = True):
        self.path = Path(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or default_threads())
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if spinning and spin_stop:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        providers = list(providers or ["CPUExecutionProvider"])
        src = self.path
        try:
            if cache and providers == ["CPUExecutionProvider"]:
                src = self._cached(so)
            if src == self.path:
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            else:  # already optimised: loading it as is skips the passes
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.session = ort.InferenceSession(str(src), so, providers=providers)
            self.source = src  # the file the session was built from (the cache, when one is used)
        except DamageError:
            raise
        except Exception as e:  # ORT raises its own types for bad files
            raise DamageError(f"{self.path}: not a loadable ONNX model: {e}") from e
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs[:2]]
        self.input_shape = _dims(self.session.get_inputs()[0].shape)
        self.output_shapes = [_dims(o.shape) for o in outputs[:2]]
        self.n_outputs = len(outputs)

    def _cached(self, so: ort.SessionOptions) -> Path:
        """The cached optimised graph (written first if absent); the model itself when it cannot be cached."""
        cached = optimized_cache_path(self.path)
        if cached.is_file():
            return cached
        if not os.access(self.path.parent, os.W_OK):
            return self.path
        opt = ort.SessionOptions()
        opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opt.intra_op_num_threads = 1
        opt.log_severity_level = 3  # the warning that an NCHWc graph is hardware-specific: the key has the ISA

        def write(tmp: str) -> None:
            opt.optimized_model_filepath = tmp
            ort.InferenceSession(str(self.path), opt, providers=["CPUExecutionProvider"])

        try:
            atomic_write(cached, write, suffix=".tmp")
        except Exception as e:  # a model ORT cannot load fails below with the usual message
            log.debug("%s: optimised graph not cached: %s", self.path, e)
            return self.path
        for old in self.path.parent.glob(f"{self.path.name}{CACHE_TAG}*"):
            if old != cached:  # caches of earlier versions of this file
                old.unlink(missing_ok=True)
        return cached

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out0, out1 = self.session.run(self.output_names, {self.input_name: batch})
        return out0, out1


def _ov_dims(shape) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in shape]


class OpenVinoRuntime:
    """OpenVINO CPU plugin on the same ``.onnx`` file (read by ``openvino.Core().read_model``).

    Args:
        path: the ``.onnx`` file.
        threads: inference threads (None: ``default_threads()``).
        precision: ``f32`` (exact, the parity rule's reference) or ``bf16`` (OpenVINO's own default
            on CPUs with AMX/AVX512-BF16: faster, about 3 significant digits).

    Raises:
        DamageError: OpenVINO is not installed, or cannot read or compile the model.
    """

    name = "openvino"

    def __init__(self, path: Path, threads: int | None = None, precision: str = "f32"):
        self.path = Path(path)
        if not openvino_available():
            raise DamageError(f"{self.path}: OpenVINO is not installed (pip install 'damage[openvino]')")
        import openvino as ov

        try:
            core = ov.Core()
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, "CPU", {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": int(threads or default_threads()),
                "INFERENCE_PRECISION_HINT": precision,
            })
        except Exception as e:  # OpenVINO raises RuntimeError for unreadable or unsupported graphs
            raise DamageError(f"{self.path}: OpenVINO cannot load the model: {e}") from e
        self.request = self.compiled.create_infer_request()
        self.input_shape = _ov_dims(self.compiled.input(0).get_partial_shape())
        self.output_shapes = [_ov_dims(o.get_partial_shape()) for o in self.compiled.outputs[:2]]
        self.n_outputs = len(self.compiled.outputs)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.request.infer({0: batch})
        # the request's output tensors are reused by its next infer(): copy them out
        out0 = np.array(self.request.get_output_tensor(0).data, copy=True)
        out1 = np.array(self.request.get_output_tensor(1).data, copy=True)
        return out0, out1


def open_runtime(name: str, path: Path, threads: int | None = None, providers: list[str] | None = None,
                 spinning: bool = True, cache: bool = True, precision: str = "f32") -> OnnxRuntime | OpenVinoRuntime:
    """A runtime by its resolved name (``onnxruntime`` | ``openvino``); the options each does not take are ignored."""
    if name == "openvino":
        return OpenVinoRuntime(path, threads, precision)
    if name == "onnxruntime":
        return OnnxRuntime(path, threads, providers, spinning, cache)
    raise DamageError(f"{path}: unknown runtime {name!r} (expected one of {', '.join(RUNTIMES)})")


# ----------------------------------------------------------------------------- metadata


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _fields(buf: memoryview):
    """(field number, value) of a protobuf message; length-delimited values as memoryviews (not copied)."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated field")
        yield num, value


MODEL_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}


def raw_metadata(path: Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as strings, read without loading the graph into any runtime.

    Walks the top-level protobuf fields and skips the graph by its length, so this costs one
    read of the file and no parsing of the weights (the predictor needs the metadata before it
    knows which runtime to open).

    Raises:
        DamageError: the file is not an ONNX protobuf.
    """
    path = Path(path)
    try:
        buf = memoryview(path.read_bytes())
        out: dict[str, str] = {}
        for num, value in _fields(buf):
            if num == MODEL_METADATA_PROPS and isinstance(value, memoryview):
                entry = {n: bytes(v).decode("utf-8") for n, v in _fields(value) if isinstance(v, memoryview)}
                out[entry.get(1, "")] = entry.get(2, "")
        return out
    except (ValueError, UnicodeDecodeError) as e:
        raise DamageError(f"{path}: not a loadable ONNX model (cannot read its metadata: {e})") from e
