"""The TensorRT backend: an artifact's bf16 engine (model.plan) behind the common Reranker interface.

No torch and no plugin module: the engine embeds its attention kernels as PTX (an ahead-of-time
plugin), so plain TensorRT deserializes and runs it. Device memory and the stream come from
polygraphy's CUDA wrapper (libcudart through ctypes); the GPU's facts from the driver (libcuda
through ctypes).

Before anything is deserialized, the manifest is checked against this process: the exact TensorRT
version that built the plan, the GPU's compute capability, and a driver new enough for the plugin's
PTX. A mismatch is an EnvironmentMismatch that names both sides and what to do, not a crash inside
TensorRT.

Batches: the packed-batch layer (ettin_runtime.reranker) cuts pairs within the engine's optimization
profile (pairs and tokens; a caller's `batch_size` is clamped to it), so no shape ever exceeds what
the engine was built for; `_score` refuses one that would.

Concurrency: one execution context, one stream and one set of device buffers behind a lock.
Tokenizing, packing and splitting run outside the lock, so concurrent callers overlap their CPU work
with each other's GPU work; the GPU runs one batch at a time, which is what one engine on one GPU
does anyway. (A second context on the same optimization profile is not promised by every TensorRT
10.x release, so none is created.)
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import CU_SEQLENS, INPUT_IDS, SCORES, Artifact, Limits, TensorRTFacts
from ..errors import ArtifactError, EttinError, MissingDependency
from ..loading import LoadOptions
from ..packing import PackedBatch, PairEncoder
from ..reranker import PackedBatchReranker

INPUT_NAMES = (INPUT_IDS, CU_SEQLENS)
OUTPUT_NAME = SCORES
INSTALL_TENSORRT = (
    "pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com  (tensorrt-cu13 for a CUDA 13 "
    "driver), or run in NVIDIA's TensorRT / Triton Inference Server container"
)
INSTALL_POLYGRAPHY = "pip install polygraphy  (device buffers and the CUDA stream; pure Python over libcudart)"

# PTX ISA version -> the oldest CUDA driver API version (cuDriverGetVersion) that JIT-compiles it: the
# PTX ISA release history (as cuda-python's cuda.bindings.utils copies it, through 9.1 = CUDA 13.1; 8.6
# came with 12.7, so a 12.6 driver stops at 8.5), continued for 13.x as Triton's ptx_get_version
# counts it (13.N -> 9.N). The build reads it backwards (highest_ptx_for_driver) to choose the ISA it
# compiles for; the runtime forwards, to refuse a driver too old for the plan's PTX.
PTX_ISA_MIN_DRIVER = {
    "7.8": 11080, "8.0": 12000, "8.1": 12010, "8.2": 12020, "8.3": 12030, "8.4": 12040,
    "8.5": 12050, "8.6": 12070, "8.7": 12080, "8.8": 12090, "9.0": 13000, "9.1": 13010,
    "9.2": 13020, "9.3": 13030, "9.4": 13040,
}
# TensorRT releases with a known fault for this engine, by (first, last) version inclusive. Ragged
# serving changes the input shape on nearly every batch, so a leak per shape change is a slow outage.
KNOWN_TENSORRT_PROBLEMS = (
    ((11, 1, 0), (11, 2, 1),
     "leaks a CUDA module (GPU memory) on every input-shape change of an engine with an AOT plugin, and "
     "packed batches change shape on nearly every call (NVIDIA/TensorRT#4849, open, reported for 11.1 and "
     "11.2.1). Build and serve with a TensorRT release outside 11.1 - 11.2.1, in matching containers."),
)


class EnvironmentMismatch(ArtifactError):
    """This machine cannot run this engine (TensorRT version, GPU or driver differ from the build's)."""


class GpuUnavailable(EttinError, RuntimeError):
    """No usable NVIDIA driver or CUDA device; the message says what is missing."""


# --- the GPU, from the driver (no torch, no cuda-python needed) -----------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    driver_version: str | None  # the kernel module's version, e.g. "550.54.15"
    cuda_driver_version: int | None  # cuDriverGetVersion, e.g. 12040 for CUDA 12.4

    @property
    def capability(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def cuda_version(self) -> str | None:
        return cuda_version_text(self.cuda_driver_version)


def cuda_version_text(version: int | None) -> str | None:
    return None if version is None else f"{version // 1000}.{version % 1000 // 10}"


_CU_ATTRIBUTE_CC_MAJOR, _CU_ATTRIBUTE_CC_MINOR = 75, 76


def probe_gpu(device: int = 0) -> GpuInfo:
    """Name, compute capability and driver of one CUDA device, asked from libcuda directly (seconds)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise GpuUnavailable(
            "no NVIDIA driver here (libcuda.so.1 cannot be loaded): TensorRT engines run on an NVIDIA GPU with "
            "its driver installed (on a container, start it with --gpus all)."
        ) from error

    def check(rc: int, what: str) -> None:
        if rc != 0:
            text = ctypes.c_char_p()
            lib.cuGetErrorString(rc, ctypes.byref(text))
            detail = (text.value or b"unknown error").decode(errors="replace")
            raise GpuUnavailable(f"the NVIDIA driver refused {what}: CUDA error {rc} ({detail}).")

    check(lib.cuInit(0), "to initialise CUDA")
    count = ctypes.c_int()
    check(lib.cuDeviceGetCount(ctypes.byref(count)), "to count devices")
    if count.value <= device:
        raise GpuUnavailable(f"CUDA device {device} asked for, but the driver sees {count.value} device(s).")
    handle = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(handle), device), f"device {device}")
    name = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(name, 256, handle), "the device name")
    major, minor, version = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    check(lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTRIBUTE_CC_MAJOR, handle), "the compute capability")
    check(lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTRIBUTE_CC_MINOR, handle), "the compute capability")
    check(lib.cuDriverGetVersion(ctypes.byref(version)), "its version")
    return GpuInfo(name.value.decode(errors="replace"), (major.value, minor.value), _kernel_driver_version(),
                   version.value)


def _kernel_driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9]+(?:\.[0-9]+)+)", text)
    return match.group(1) if match else None


# --- manifest against this process (pure: tested with fakes) -------------------------------------------


def driver_needed_for_ptx(ptx_version: str | None) -> int | None:
    """The oldest cuDriverGetVersion that loads PTX of this ISA version, or None when unknown."""
    return PTX_ISA_MIN_DRIVER.get(str(ptx_version)) if ptx_version else None


def highest_ptx_for_driver(cuda_driver_version: int) -> str:
    """The newest PTX ISA version (e.g. "8.4") a driver of this cuDriverGetVersion (e.g. 12040) loads.
    A driver newer than the table's newest entry is taken to load that entry. Raises ValueError for a
    driver older than every entry."""
    known = [isa for isa, needed in PTX_ISA_MIN_DRIVER.items() if needed <= cuda_driver_version]
    if not known:
        raise ValueError(f"a driver for CUDA {cuda_version_text(cuda_driver_version)} is older than every PTX ISA "
                         f"version known here (the oldest, {min(PTX_ISA_MIN_DRIVER)}, needs CUDA "
                         f"{cuda_version_text(min(PTX_ISA_MIN_DRIVER.values()))}).")
    return max(known, key=lambda isa: tuple(int(p) for p in isa.split(".")))


def _release(version) -> tuple[int, int, int]:
    """"11.2.1.2" -> (11, 2, 1); "11.1" -> (11, 1, 0); stops at the first non-numeric part."""
    parts = []
    for piece in str(version or "").split(".")[:3]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts + [0] * (3 - len(parts)))


def tensorrt_version_warnings(version: str | None) -> list[str]:
    """Known faults of this TensorRT release for this engine, each with what to do (empty: none known)."""
    if not _release(version)[0]:
        return []
    return [f"TensorRT {version} {problem}" for first, last, problem in KNOWN_TENSORRT_PROBLEMS
            if first <= _release(version) <= last]


def environment_problems(facts: TensorRTFacts, tensorrt_version: str, gpu: GpuInfo, *,
                         check_driver: bool = True) -> list[str]:
    """Everything that stops this engine from running here, each with what to do. Empty: it runs."""
    problems = []
    built_with = facts.tensorrt_version
    if str(built_with) != str(tensorrt_version):
        problems.append(
            f"the engine was built with TensorRT {built_with}, this process has TensorRT {tensorrt_version}: a "
            f"plan loads only in the exact TensorRT release that built it. Install that one "
            f"(pip install tensorrt-cu12=={built_with} --extra-index-url https://pypi.nvidia.com, or the container "
            "release that ships it), or rebuild here: ettin-export build ... --target h100."
        )
    built_for = facts.compute_capability
    if str(built_for) != gpu.capability:
        problems.append(
            f"the engine was built for compute capability {built_for} "
            f"({facts.gpu_name or 'the build GPU'}), but this GPU is {gpu.name} "
            f"(compute capability {gpu.capability}); its attention kernels are PTX for "
            f"{facts.ptx_target or built_for} only. Run it on that kind of GPU, or rebuild on this one with a "
            "matching --target."
        )
    needed = driver_needed_for_ptx(facts.ptx_version)
    if check_driver and needed is not None and gpu.cuda_driver_version is not None and gpu.cuda_driver_version < needed:
        problems.append(
            f"the plugin's PTX is ISA {facts.ptx_version}, which needs a driver for CUDA "
            f"{cuda_version_text(needed)} or newer; this driver ({gpu.driver_version or 'version unknown'}) supports "
            f"CUDA {gpu.cuda_version}. Update the NVIDIA driver (or rebuild with a lower ptx_version), or pass "
            "check_driver=False if your TensorRT compiles the PTX itself."
        )
    return problems


def check_environment(facts: TensorRTFacts, tensorrt_version: str, gpu: GpuInfo, *, where: str = "this artifact",
                      check_driver: bool = True) -> None:
    problems = environment_problems(facts, tensorrt_version, gpu, check_driver=check_driver)
    if problems:
        raise EnvironmentMismatch(f"{where} cannot run here:\n  - " + "\n  - ".join(problems))


# --- TensorRT itself ----------------------------------------------------------------------------------------


def import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as error:  # OSError: the bindings without NVIDIA's libraries
        raise MissingDependency(
            f"TensorRT is not importable here ({type(error).__name__}: {error}). This artifact is a TensorRT "
            f"engine: {INSTALL_TENSORRT}, with the exact version recorded in its manifest.json."
        ) from error
    return tensorrt


def _import_polygraphy_cuda():
    try:
        from polygraphy import cuda
        from polygraphy.datatype import DataType
    except ImportError as error:
        raise MissingDependency(f"The TensorRT runtime needs polygraphy's CUDA wrapper: {INSTALL_POLYGRAPHY}.") from error
    return cuda, DataType


class EngineSession:
    """One deserialized engine, one execution context, one stream and device buffers at the profile's
    maxima; `run` is serialized by a lock, so one session serves any number of threads."""

    def __init__(self, trt, plan: bytes, *, device: int = 0, name: str = "engine"):
        cuda, DataType = _import_polygraphy_cuda()
        self._cuda, self._device = cuda, int(device)
        self._lock = threading.Lock()
        self._errors: deque[str] = deque(maxlen=20)
        self._set_device()
        self._logger = _make_logger(trt, self._errors)
        try:
            self._runtime = trt.Runtime(self._logger)
        except TypeError as error:  # pybind's "factory function returned nullptr": no usable GPU
            raise GpuUnavailable(f"TensorRT could not initialise CUDA ({self._last_errors() or error}).") from error
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(
                f"TensorRT {trt.__version__} could not deserialize {name}: {self._last_errors() or 'no reason given'}. "
                "The file may be damaged, or built by another TensorRT release; rebuild it with `ettin-export build`."
            )
        self._check_io(trt, name)
        shapes = {n: self.engine.get_tensor_profile_shape(n, 0) for n in INPUT_NAMES}
        self.limits = Limits(max_batch_pairs=int(shapes[CU_SEQLENS][2][0]) - 1,
                             max_batch_tokens=int(shapes[INPUT_IDS][2][0]))
        self._context = self.engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context: {self._last_errors()}")
        self._stream = cuda.Stream()
        self._buffers = {
            INPUT_IDS: cuda.DeviceArray((self.limits.max_batch_tokens,), DataType.INT32),
            CU_SEQLENS: cuda.DeviceArray((self.limits.max_batch_pairs + 1,), DataType.INT32),
            OUTPUT_NAME: cuda.DeviceArray((self.limits.max_batch_pairs, 1), DataType.FLOAT32),
        }
        for tensor, buffer in self._buffers.items():
            self._context.set_tensor_address(tensor, buffer.ptr)

    def _last_errors(self) -> str:
        return " | ".join(self._errors)

    def _set_device(self) -> None:
        if self._device:  # the current device is per thread; 0 is everyone's default
            self._cuda.wrapper().check(self._cuda.wrapper().handle.cudaSetDevice(self._device))

    def _check_io(self, trt, name: str) -> None:
        expected = {INPUT_IDS: (trt.TensorIOMode.INPUT, trt.int32), CU_SEQLENS: (trt.TensorIOMode.INPUT, trt.int32),
                    OUTPUT_NAME: (trt.TensorIOMode.OUTPUT, trt.float32)}
        found = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        problems = [f"{tensor} is missing" for tensor in expected if tensor not in found]
        for tensor, (mode, dtype) in expected.items():
            if tensor not in found:
                continue
            actual = (self.engine.get_tensor_mode(tensor), self.engine.get_tensor_dtype(tensor))
            if actual != (mode, dtype):
                problems.append(f"{tensor} is {actual[0]} {actual[1]}, expected {mode} {dtype}")
        if problems:
            raise ArtifactError(f"{name} is not an ettin-export reranker engine: {'; '.join(problems)}.")

    def run(self, input_ids: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
        """float32 scores [B] for one packed batch within the profile."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        cu_seqlens = np.ascontiguousarray(cu_seqlens, dtype=np.int32)
        pairs = len(cu_seqlens) - 1
        scores = np.empty((pairs, 1), dtype=np.float32)
        with self._lock:
            self._set_device()
            context, stream = self._context, self._stream
            for tensor, length in ((INPUT_IDS, len(input_ids)), (CU_SEQLENS, len(cu_seqlens))):
                if not context.set_input_shape(tensor, (length,)):
                    raise ValueError(f"{tensor} of length {length} is outside the engine's profile {self.limits}: "
                                     f"{self._last_errors()}")
            self._buffers[INPUT_IDS].copy_from(input_ids, stream)
            self._buffers[CU_SEQLENS].copy_from(cu_seqlens, stream)
            if not context.execute_async_v3(stream.ptr):
                raise RuntimeError(f"TensorRT failed to run the engine on {pairs} pairs: {self._last_errors()}")
            self._buffers[OUTPUT_NAME].view((pairs, 1)).copy_to(scores, stream)
            stream.synchronize()
        return scores.reshape(-1)

    def close(self) -> None:
        with self._lock:
            for buffer in getattr(self, "_buffers", {}).values():
                buffer.free()
            self._buffers = {}
            if getattr(self, "_stream", None) is not None:
                self._stream.free()
                self._stream = None
            self._context = self.engine = self._runtime = None


def _make_logger(trt, errors: deque):
    class _Logger(trt.ILogger):
        """Keeps TensorRT's errors for our messages; prints its warnings to stderr."""

        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, message):  # called from C++: must never raise
            try:
                if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                    errors.append(str(message))
                if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR, trt.Logger.WARNING):
                    print(f"[TensorRT] {message}", file=sys.stderr)
            except Exception:  # noqa: BLE001
                pass

    return _Logger()


# --- the reranker ---------------------------------------------------------------------------------------


class TensorRTReranker(PackedBatchReranker):
    """A bf16 TensorRT engine. `session` needs only `run(input_ids, cu_seqlens) -> float32 [B]` and
    `limits` (tests pass a stand-in); batches never exceed the engine's profile."""

    def __init__(self, session, encoder: PairEncoder, artifact: Artifact, *, max_batch_tokens: int | None = None,
                 max_batch_pairs: int | None = None):
        limits = session.limits
        tokens = _within("max_batch_tokens", max_batch_tokens, limits.max_batch_tokens)
        pairs = _within("max_batch_pairs", max_batch_pairs, limits.max_batch_pairs)
        if encoder.max_length > limits.max_batch_tokens:
            raise ArtifactError(
                f"max_length {encoder.max_length} exceeds the engine's profile of {limits.max_batch_tokens} tokens per "
                "run: one pair would not fit. Load with a smaller max_length, or rebuild with a larger "
                "--max-batch-tokens."
            )
        super().__init__(encoder, activation=artifact.score_activation, max_batch_tokens=tokens, max_batch_pairs=pairs,
                         token_limit=limits.max_batch_tokens)
        self.session = session
        self.artifact = artifact

    @classmethod
    def from_artifact(cls, artifact: Artifact, options: LoadOptions, *, check_driver: bool = True) -> TensorRTReranker:
        if artifact.engine.format != "tensorrt":
            raise ArtifactError(f"{artifact.root} holds a {artifact.engine.format} graph, not a TensorRT engine.")
        device_index = _device_index(options.device)
        trt = import_tensorrt()
        try:
            gpu = probe_gpu(device_index)
        except GpuUnavailable as error:
            raise EnvironmentMismatch(f"{artifact.root} is a TensorRT engine and needs an NVIDIA GPU: {error}") from error
        check_environment(artifact.engine.tensorrt, trt.__version__, gpu, where=str(artifact.root),
                          check_driver=check_driver)
        for problem in tensorrt_version_warnings(trt.__version__):
            warnings.warn(problem, RuntimeWarning, stacklevel=2)
        plan_path = artifact.path(artifact.engine.file)
        session = EngineSession(trt, plan_path.read_bytes(), device=device_index, name=str(plan_path))
        declared = (artifact.limits.max_batch_pairs, artifact.limits.max_batch_tokens)
        if declared != (session.limits.max_batch_pairs, session.limits.max_batch_tokens):
            session.close()
            raise ArtifactError(
                f"{artifact.root}: manifest.json says the profile holds {declared[0]} pairs and {declared[1]} tokens, "
                f"the engine {session.limits.max_batch_pairs} and {session.limits.max_batch_tokens}; the artifact "
                "was edited or mixed up. Rebuild it."
            )
        encoder = PairEncoder.from_dir(artifact.root, options.max_length or artifact.max_length)
        return cls(session, encoder, artifact, max_batch_tokens=options.max_batch_tokens,
                   max_batch_pairs=options.max_batch_pairs)

    def _score(self, batch: PackedBatch) -> np.ndarray:
        limits = self.session.limits
        if batch.num_pairs > limits.max_batch_pairs or batch.num_tokens > limits.max_batch_tokens:
            raise ArtifactError(  # the packed-batch layer keeps within the profile; this is the last guard
                f"a batch of {batch.num_pairs} pairs / {batch.num_tokens} tokens exceeds the engine's profile "
                f"({limits.max_batch_pairs} pairs, {limits.max_batch_tokens} tokens)."
            )
        return np.asarray(self.session.run(batch.input_ids, batch.cu_seqlens), dtype=np.float32).reshape(-1)

    def close(self) -> None:
        if hasattr(self.session, "close"):
            self.session.close()


def _within(name: str, asked: int | None, maximum: int) -> int:
    if asked is None:
        return maximum
    if asked < 1 or asked > maximum:
        raise ArtifactError(f"{name}={asked} is outside the engine's profile (1..{maximum}); ask for at most {maximum}.")
    return int(asked)


def _device_index(device: int | str) -> int:
    if isinstance(device, int):
        return device
    text = str(device).strip().lower()
    if text in ("cuda", "auto", "gpu"):
        return 0
    match = re.fullmatch(r"(?:cuda:)?(\d+)", text)
    if not match:
        raise ValueError(f"device must be a CUDA device index or 'cuda:N'; got {device!r}.")
    return int(match.group(1))
