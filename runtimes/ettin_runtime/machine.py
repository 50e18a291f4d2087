"""The CPU a figure or a gate belongs to: its name, the x86 features that decide speed and numerics,
and the class they put it in.

    cpu_name()            'AMD EPYC 9B45'  (/proc/cpuinfo's model name)
    cpu_features()        ['avx2', 'fma', 'avx512f', ...]  (those of CPU_FEATURES it reports)
    cpu_class(features)   'avx512-bf16' | 'avx512-vnni' | 'avx512' | 'avx2-vnni' | 'avx2' | 'baseline'
    native_bf16(features) True where bf16 matrix products run in bf16 (AVX512_BF16 or AMX-BF16)
    this_machine()        {"cpu", "features", "class", "cores"}: what an artifact records of its gate's CPU
    cpu_threads(n)        threads per CPU run: n, else $ETTIN_CPU_THREADS, else None (the runtime's default)

Two CPUs of one class run the same kernels (oneDNN / MLAS pick their code paths by these features), so a
gate judged on one holds on the other; across classes the numerics of int8 (VNNI or not) and bf16
(native or emulated in fp32) differ, and the speed ranking of runtimes may too.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .errors import BadSetting

# AVX2/AVX-512: fp32 GEMM width; VNNI: int8 dot products without saturating int16 pair sums;
# AVX512_BF16 / AMX: native bf16.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
BF16_FEATURES = ("avx512_bf16", "amx_bf16")
CPU_CLASSES = ("avx512-bf16", "avx512-vnni", "avx512", "avx2-vnni", "avx2", "baseline")
THREADS_ENV = "ETTIN_CPU_THREADS"


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """Those of CPU_FEATURES this CPU reports, in that order; [] where /proc/cpuinfo is unreadable."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [name for name in CPU_FEATURES if name in flags]


def native_bf16(features=None) -> bool:
    features = cpu_features() if features is None else features
    return any(name in features for name in BF16_FEATURES)


def cpu_class(features=None) -> str:
    """The kernel class of a CPU with these features (this CPU's by default)."""
    f = set(cpu_features() if features is None else features)
    if "avx512f" in f:
        if f & set(BF16_FEATURES):
            return "avx512-bf16"
        return "avx512-vnni" if "avx512_vnni" in f else "avx512"
    if "avx2" in f:
        return "avx2-vnni" if "avx_vnni" in f else "avx2"
    return "baseline"


def this_machine() -> dict:
    features = cpu_features()
    return {"cpu": cpu_name(), "features": features, "class": cpu_class(features), "cores": os.cpu_count()}


def describe(machine: dict | None = None) -> str:
    """e.g. 'AMD EPYC (avx2 fma; class avx2), 2 cores'."""
    m = machine or this_machine()
    return f"{m['cpu']} ({' '.join(m['features']) or 'features unknown'}; class {m['class']}), {m['cores']} cores"


def cpu_threads(requested: int | None = None) -> int | None:
    """Threads for one CPU run (ONNX Runtime's intra-op pool, OpenVINO's INFERENCE_NUM_THREADS): `requested`
    when given, else $ETTIN_CPU_THREADS, else None, the runtime's own default of one per core (ONNX Runtime
    counts the machine's cores, not a container's CPU quota or this process's affinity mask)."""
    if requested is not None:
        return int(requested)
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BadSetting(f"{THREADS_ENV}={value!r}: give a whole number of threads, 1 or more (or unset it for "
                         "one thread per core).")
    return int(value)


def ort_session_options(ort, threads: int | None = None):
    """ONNX Runtime SessionOptions with `cpu_threads(threads)` intra-op threads (when set)."""
    options = ort.SessionOptions()
    count = cpu_threads(threads)
    if count is not None:
        options.intra_op_num_threads = count
    return options


def ort_cpu_session(ort, source):
    """An ONNX Runtime session on the CPU provider for `source` (a path or serialized model bytes), on
    `cpu_threads()` threads: the exporter's own checking and probing sessions."""
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), ort_session_options(ort),
                                providers=["CPUExecutionProvider"])


def openvino_config(config: dict, threads: int | None = None) -> dict:
    """An OpenVINO compile config with INFERENCE_NUM_THREADS from `cpu_threads(threads)` (when set)."""
    count = cpu_threads(threads)
    return config if count is None else {**config, "INFERENCE_NUM_THREADS": count}
