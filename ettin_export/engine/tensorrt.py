"""TensorRT for `--target h100`: preflight, engine profile, plan build, and the runtime hook.

    preflight(target)           seconds: TensorRT >= 10.9 with tensorrt.plugin, a CUDA GPU and driver, the
                                target's compute capability, a supported Triton for the kernel compile, a
                                PTX ISA version both the driver and Triton accept (and the polygraphy /
                                PyTorch-CUDA pieces the build and its parity gate use)
    engine_profile(...)         the `limits` manifest entry: one optimization profile over total tokens
                                and pair count
    build_engine(...)           register the AOT plugin -> parse the bf16 ONNX (polygraphy's loaders, no
                                parser flags) -> one plugin layer per VarlenAttention node, or stop ->
                                build with the profile and a timing cache named by TensorRT version and
                                compute capability -> plan + facts for the manifest
    load_runtime(artifact)      the artifact's TensorRTReranker (ettin_runtime, no torch)

Everything that needs no TensorRT is a plain function of ettin_export.engine.rules, tested on a CPU
(the profile math, the parser rules, layer counting, the PTX ISA choice, version rules, the manifest
facts).
TensorRT, polygraphy and the GPU are imported only inside `preflight` and `build_engine`.
"""

from __future__ import annotations

import time
from pathlib import Path

from ettin_runtime.artifact import Limits

from ettin_export.engine.rules import (
    INSTALL_TENSORRT,
    MIN_TENSORRT,
    ONNX_ONLY_HINT,
    PARSER_FLAGS,
    TensorRTUnavailable,
    builder_settings,
    check_parser_rules,
    check_plugin_layers,
    count_plugin_layers,
    engine_facts,
    kernel_ptx_version,
    tensorrt_version_problem,
    timing_cache_path,
)
from ettin_export.errors import BuildError


# --- preflight: seconds, before any long work ------------------------------------------------------------------


def _import_tensorrt_modules():
    """(tensorrt, tensorrt.plugin or None); raises ImportError/OSError when TensorRT is absent."""
    import tensorrt as trt

    try:
        import tensorrt.plugin as trtp
    except ImportError:
        trtp = None
    return trt, trtp


def _probe_gpu():
    from ettin_runtime.backends.tensorrt import probe_gpu

    return probe_gpu(0)


def _builder_error(trt) -> str | None:
    """None when TensorRT can create a Builder (it needs a working CUDA device), else why not."""
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except TypeError as error:  # pybind's "factory function returned nullptr": CUDA init failed
        return str(error)
    del builder
    return None


def _triton_version() -> str:
    """The installed OpenAI Triton's version; ImportError (with what to install) when it is missing or
    outside the range the AOT compile supports."""
    import triton

    from ettin_plugins import aot

    problem = aot.triton_version_problem(triton.__version__)
    if problem:
        raise aot.TritonVersionError(problem)
    return triton.__version__


def _triton_default_ptx(ptx_arch: str) -> int:
    from ettin_plugins import aot

    return aot.triton_default_ptx_version(ptx_arch)


def _check_polygraphy() -> None:
    from polygraphy import cuda
    from polygraphy.backend.trt import CreateConfig

    del CreateConfig  # importable is all the build needs here
    cuda.wrapper()  # loads libcudart: the runtime's device buffers


def _torch_cuda() -> str:
    """The bf16 reference's attention implementation, when PyTorch sees the GPU; raises otherwise."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"PyTorch {torch.__version__} here sees no CUDA device")
    from ettin_export.model.attention import cuda_attention_implementation

    return cuda_attention_implementation()


def _needs(what: str, how: str, *, elsewhere: bool = True) -> TensorRTUnavailable:
    return TensorRTUnavailable(f"{what}\n{how}" + (f"\n{ONNX_ONLY_HINT}" if elsewhere else ""))


def preflight(target) -> dict:
    """Everything `--target h100` needs, checked in seconds and in this order; raises
    TensorRTUnavailable naming what is missing and how to get it. Returns facts for the log."""
    started = time.perf_counter()
    requirement = (f"--target {target.name} builds a TensorRT engine on the GPU it targets: TensorRT >= "
                   f"{'.'.join(map(str, MIN_TENSORRT))} with tensorrt.plugin, and an NVIDIA GPU of compute capability "
                   f"{_capability_text(target)} with its driver.")
    try:
        trt, trtp = _import_tensorrt_modules()
    except (ImportError, OSError) as error:
        raise _needs(f"TensorRT is not installed here ({type(error).__name__}: {error}). {requirement}",
                     f"Get TensorRT with\n{INSTALL_TENSORRT}.") from error
    problem = tensorrt_version_problem(trt.__version__, trtp is not None, hasattr(trtp, "aot_impl"))
    if problem:
        raise _needs(f"{problem} {requirement}", f"Upgrade with\n{INSTALL_TENSORRT}.")

    from ettin_runtime.backends.tensorrt import GpuUnavailable

    try:
        gpu = _probe_gpu()
    except GpuUnavailable as error:
        raise _needs(f"No CUDA GPU is usable here: {error} {requirement}",
                     "Run the build on a machine with the GPU and its NVIDIA driver (containers: --gpus all).",
                     ) from error
    builder_error = _builder_error(trt)
    if builder_error:
        raise _needs(
            f"TensorRT {trt.__version__} cannot use the GPU ({gpu.name}): creating a Builder failed ({builder_error}); "
            "TensorRT logs 'CUDA initialization failure' when the driver is too old for it or no device is visible.",
            f"Update the NVIDIA driver (this one supports CUDA {gpu.cuda_version}) or install the TensorRT build for "
            "it (tensorrt-cu12 / tensorrt-cu13).")
    if target.compute_capability is not None and gpu.compute_capability != tuple(target.compute_capability):
        raise TensorRTUnavailable(
            f"This GPU is {gpu.name} (compute capability {gpu.capability}), but --target {target.name} builds for "
            f"compute capability {_capability_text(target)} ({target.ptx_arch}: {target.description}); the plugin's "
            "kernels are compiled for that architecture only and the plan would not run elsewhere. Run the build on "
            f"that GPU, or choose the target that matches this one."
        )
    from ettin_plugins import aot

    try:
        triton_version = _triton_version()
    except ImportError as error:
        missing = "" if isinstance(error, aot.TritonVersionError) else "OpenAI Triton is not installed: "
        raise _needs(f"{missing}{error} The build compiles the attention kernel to PTX with it.",
                     f"Install it with: pip install '{aot.TRITON_REQUIREMENT}'  (or pip install "
                     "'ettin-export[kernel]').", elsewhere=False) from error
    ptx_version = kernel_ptx_version(gpu, target.ptx_arch, _triton_default_ptx(target.ptx_arch))
    try:
        _check_polygraphy()
    except Exception as error:  # noqa: BLE001 - ImportError, OSError (no libcudart) or polygraphy's own
        raise _needs(f"polygraphy or the CUDA runtime library is missing ({type(error).__name__}: {error}): the build "
                     "parses and builds through polygraphy, and the engine runs on its CUDA buffers.",
                     "Install with: pip install polygraphy nvidia-cuda-runtime-cu12  (or pip install "
                     "'ettin-export[tensorrt]'; NVIDIA's TensorRT container has both).",
                     elsewhere=False) from error
    try:
        reference = _torch_cuda()
    except (ImportError, RuntimeError) as error:
        raise _needs(f"{error}: the parity gate runs the packed PyTorch reference (fp32, and bf16 with flash "
                     "attention) on this GPU.",
                     "Install a CUDA build of PyTorch (https://pytorch.org/get-started/locally/).",
                     elsewhere=False) from error
    from ettin_runtime.backends.tensorrt import tensorrt_version_warnings

    facts = {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu.name,
        "compute_capability": gpu.capability,
        "driver_version": gpu.driver_version,
        "cuda_driver_version": gpu.cuda_version,
        "triton_version": triton_version,
        "ptx_version": aot.ptx_version_text(ptx_version),
        "bf16_reference_attention": reference,
    }
    warnings = tensorrt_version_warnings(trt.__version__)
    if warnings:
        facts["warnings"] = warnings
    facts["preflight_s"] = round(time.perf_counter() - started, 2)
    return facts


def _capability_text(target) -> str:
    cc = target.compute_capability
    return f"{cc[0]}.{cc[1]}" if cc else "any"


# --- the build ------------------------------------------------------------------------------------------------


def build_engine(onnx_path, plan_path, limits: Limits, target, timing_cache, steps) -> dict:
    """bf16 ONNX -> TensorRT plan at plan_path; returns the manifest's engine facts."""
    import onnx

    trt, _ = _import_tensorrt_modules()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    from ettin_plugins import aot, spec, trt_plugin
    from ettin_runtime.backends.tensorrt import tensorrt_version_warnings

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    started = time.perf_counter()
    with steps.step("checking the graph against the plugin's registration (TensorRT parser rules)"):
        proto = onnx.load(str(onnx_path), load_external_data=False)
        expected = check_parser_rules(proto, PARSER_FLAGS)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        del proto
    gpu = _probe_gpu()
    for warning in tensorrt_version_warnings(trt.__version__):
        steps.note(f"WARNING: {warning}")
    # The same ISA for every kernel: the plugin's aot_impl compiles with what register() was given.
    ptx_version = kernel_ptx_version(gpu, target.ptx_arch, _triton_default_ptx(target.ptx_arch))
    with steps.step(f"registering {spec.PLUGIN_ID} (ahead-of-time, PTX ISA {aot.ptx_version_text(ptx_version)} "
                    f"for {target.ptx_arch})"):
        trt_plugin.register(target.ptx_arch, ptx_version=ptx_version)
        # The same compile (cached) the plugin's aot_impl does for a global layer: its PTX facts go in the manifest.
        kernel = aot.compile_varlen_attention("bf16", -1, aot.parse_target(target.ptx_arch),
                                              aot.TACTICS[min(aot.TACTICS)], ptx_version=ptx_version)
    settings = builder_settings(trt.__version__)
    flags = [getattr(trt.OnnxParserFlag, name) for name in settings["parser_flags"]] or None
    timing_cache = timing_cache_path(timing_cache, trt.__version__, gpu.capability)
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        with steps.step("parsing the ONNX graph (each VarlenAttention node becomes the plugin)"):
            try:
                network = network_from_onnx_path(str(onnx_path), flags=flags,
                                                 strongly_typed=settings["strongly_typed_flag"])
            except PolygraphyException as error:
                raise BuildError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}: {error} "
                                 "(the parser's own errors are printed above).") from error
            counts = count_plugin_layers(network[1], trt)
            check_plugin_layers(counts, expected, trt.__version__)
        steps.note(f"{counts['v3']} plugin layers for {expected} VarlenAttention nodes")
        cache_existed = timing_cache.is_file()
        profile = Profile()
        for name, (low, opt, high) in limits.profile.shapes().items():
            profile.add(name, min=low, opt=opt, max=high)
        config = CreateConfig(profiles=[profile], load_timing_cache=str(timing_cache), tf32=False)
        with steps.step("building the engine (TensorRT times every tactic: minutes for the large sizes)"):
            try:
                plan = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
            except PolygraphyException as error:
                raise BuildError(f"TensorRT {trt.__version__} could not build the engine: {error} "
                                 "(its errors are printed above).") from error
            plan_path.write_bytes(bytes(plan))
    steps.note(f"plan {plan_path.stat().st_size / 2**20:.1f} MiB; timing cache "
               f"{'reused and updated' if cache_existed else 'created'} at {timing_cache}")
    return engine_facts(
        tensorrt_version=trt.__version__, gpu=gpu, kernel=kernel, plugin_layers=counts, attention_nodes=expected,
        settings=settings, opset=opset,
        timing_cache={"path": str(timing_cache), "reused": cache_existed},
        build_seconds=time.perf_counter() - started,
    )


def load_runtime(artifact):
    """The staged artifact's TensorRTReranker (ettin_runtime, no torch)."""
    return artifact.load(runtime="tensorrt")
