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

Everything that needs no TensorRT is a plain function here and tested on a CPU: the profile math,
the parser-rules check of the graph against the plugin's registration signature and against the
creators TensorRT registers under standard op names, node and layer counting, the PTX ISA choice,
version rules and the manifest facts. TensorRT, polygraphy and the GPU are imported only
inside `preflight` and `build_engine`.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from pathlib import Path

from ettin_runtime.artifact import Limits, Profile

from ettin_export.errors import BuildError

MIN_TENSORRT = (10, 9)  # tensorrt.plugin.aot_impl (ahead-of-time Python plugins) arrived in 10.9
NQ_LIKE_PAIR_TOKENS = 128  # a query of ~12 tokens and a passage of ~105, plus 3 special tokens
MAX_PROFILE_TOKENS = 1 << 20  # beyond this one run's activations outgrow any single GPU for the large sizes
INSTALL_TENSORRT = (
    "    pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com\n"
    "(tensorrt-cu13 for a CUDA 13 driver; PyPI alone only holds a placeholder), or build inside NVIDIA's "
    "container nvcr.io/nvidia/tensorrt:<YY.MM>-py3 of a release that ships TensorRT >= 10.9"
)
# The ONNX parser flags the build sets: none. ENABLE_PLUGIN_OVERRIDE would hand every node whose op type
# names a creator registered in namespace "" to that creator (ModelImporter.cpp::parseNode), and the
# VarlenAttention nodes need no flag: their plugin_namespace attribute routes them (TensorRT >= 10.7).
PARSER_FLAGS: tuple[str, ...] = ()
# Creators that TensorRT's standard plugin library registers under the name of a standard ONNX op, in
# namespace "" (initLibNvInferPlugins in plugin/api/inferPlugin.cpp and the plugins' name constants,
# NVIDIA/TensorRT tags v10.9.0 ... v11.1; polygraphy's ONNX loaders call init_libnvinfer_plugins before
# parsing). A node routed to the plugin registry under one of these names gets the legacy plugin, not
# the ONNX op: the legacy ScatterElements takes only add/mul/min/max/mean reductions, and this graph has
# ScatterElements(reduction="none") and Split nodes.
STANDARD_NAME_CREATORS = {
    "ScatterElements": "TensorRT 10.9 - 11.1 (ScatterElementsPluginV2/V3Creator)",
    "ScatterND": "TensorRT 10.9 - 11.1 (ScatterNDPluginCreator)",
    "Split": "TensorRT 10.9 - 10.16 (SplitPluginCreator)",
}
ONNX_ONLY_HINT = (
    "No such machine at hand? `ettin-export build ... --target h100 --onnx-only` writes the bf16 ONNX here "
    "and prints the command that finishes the build on the GPU machine."
)


class TensorRTUnavailable(BuildError):
    """TensorRT, the GPU or a build dependency is missing or wrong; the message says what and how to fix it."""


def version_tuple(text: str) -> tuple[int, ...]:
    """"10.9.0.34" -> (10, 9, 0, 34); stops at the first non-numeric part ("11.0.0b1" -> (11, 0))."""
    parts = []
    for piece in str(text).split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


# --- the optimization profile (pure) --------------------------------------------------------------------


def engine_profile(max_batch_pairs: int, max_length: int, max_batch_tokens: int | None = None) -> Limits:
    """The engine's one optimization profile, as the artifact's `limits`.

    A server batches by request count, not by tokens, so the token maximum is at least
    max_batch_pairs x max_length (a full batch of full-length pairs must fit); --max-batch-tokens may
    raise it, never lower it. The opt point is an NQ-like batch: every pair, ~128 tokens each."""
    _require_int("--max-batch-size", max_batch_pairs, 1)
    _require_int("--max-length", max_length, 2)
    needed = max_batch_pairs * max_length
    if max_batch_tokens is None:
        max_tokens = needed
    else:
        _require_int("--max-batch-tokens", max_batch_tokens, 1)
        if max_batch_tokens < needed:
            raise BuildError(
                f"--max-batch-tokens {max_batch_tokens} is below --max-batch-size x --max-length = {max_batch_pairs} x "
                f"{max_length} = {needed}: a server that batches {max_batch_pairs} full-length pairs would exceed the "
                "engine. Lower --max-batch-size or --max-length, or leave --max-batch-tokens out."
            )
        max_tokens = max_batch_tokens
    if max_tokens > MAX_PROFILE_TOKENS:
        raise BuildError(
            f"the profile would take up to {max_tokens} tokens per run (more than {MAX_PROFILE_TOKENS}); lower "
            "--max-batch-size, --max-length or --max-batch-tokens."
        )
    opt_tokens = min(max_tokens, max_batch_pairs * min(max_length, NQ_LIKE_PAIR_TOKENS))
    return Limits.of_profile(Profile(tokens=(1, opt_tokens, max_tokens),
                                     pairs=(1, max_batch_pairs, max_batch_pairs)))


def _require_int(flag: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BuildError(f"{flag} must be an integer of at least {minimum}; got {value!r}.")


# --- the graph against the TensorRT parser's rules (pure, onnx only) -------------------------------------


def parser_rule_problems(proto, registered_inputs=None, registered_attributes=None) -> list[str]:
    """Why the TensorRT ONNX parser would NOT swap the plugin in for each VarlenAttention node (or would
    feed it wrong): the graph's node rules (graph.validate.attention_node_problems) against the plugin's
    registration signature (ettin_plugins.trt_plugin), not the constants the exporter reads, and the
    plugin's types (bf16, fp16: a bf16-typed graph is needed)."""
    from onnx import TensorProto

    from ettin_plugins import trt_plugin

    from ettin_export.graph.validate import attention_node_problems

    inputs = tuple(registered_inputs if registered_inputs is not None else trt_plugin.registered_input_names())
    attributes = tuple(registered_attributes if registered_attributes is not None
                       else trt_plugin.registered_attribute_names())
    return attention_node_problems(proto, inputs=inputs, attributes=attributes,
                                   float_types={TensorProto.BFLOAT16: "bfloat16", TensorProto.FLOAT16: "float16"})


def plugin_routing_problems(proto, parser_flags=PARSER_FLAGS) -> list[str]:
    """The standard-op nodes that the TensorRT parser would hand to a plugin creator of TensorRT's own
    instead of importing them as ONNX ops: empty when none would be.

    The parser asks the plugin registry first for every node when ENABLE_PLUGIN_OVERRIDE is among
    `parser_flags`, and otherwise for nodes that carry a `plugin_namespace` attribute; the lookup is
    (op type, plugin_version attribute or "1", plugin_namespace attribute or "") (ModelImporter.cpp::
    parseNode and isNodeInPluginRegistry)."""
    from onnx import helper

    from ettin_plugins import spec

    override = "ENABLE_PLUGIN_OVERRIDE" in parser_flags
    problems = []
    for index, node in enumerate(proto.graph.node):
        if node.domain == spec.PLUGIN_NAMESPACE or node.op_type not in STANDARD_NAME_CREATORS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not override and "plugin_namespace" not in attrs:
            continue
        namespace = attrs.get("plugin_namespace", b"")
        namespace = namespace.decode() if isinstance(namespace, bytes) else str(namespace)
        if namespace:
            continue  # looked up in another namespace, where TensorRT registers none of these
        why = "the parser flag ENABLE_PLUGIN_OVERRIDE" if override else "its plugin_namespace attribute"
        problems.append(
            f"{node.name or f'node #{index}'} ({node.op_type}): {why} would hand it to TensorRT's own "
            f"{node.op_type} plugin creator in namespace '' ({STANDARD_NAME_CREATORS[node.op_type]}) instead of "
            "the ONNX op, which that plugin does not implement in full; parse without the flag (plugin_namespace "
            "already routes the VarlenAttention nodes) and keep plugin_namespace off standard ops."
        )
    return problems


def check_parser_rules(proto, parser_flags=PARSER_FLAGS) -> int:
    """Raise BuildError listing every broken rule (the plugin's, and no standard op routed to one of
    TensorRT's own creators under `parser_flags`); return the number of VarlenAttention nodes."""
    problems = parser_rule_problems(proto) + plugin_routing_problems(proto, parser_flags)
    if problems:
        raise BuildError("the bf16 graph does not meet the TensorRT parser's plugin rules:\n  - "
                         + "\n  - ".join(problems))
    from ettin_export.graph.validate import attention_nodes

    return len(attention_nodes(proto))


# --- the parsed network (TensorRT objects, counted with plain attribute access) ------------------------------


def count_plugin_layers(network, trt) -> dict[str, int]:
    """Plugin layers in a parsed network, by interface: {"v3": n, "v2": m}. QDP plugins are IPluginV3."""
    counts = {"v3": 0, "v2": 0}
    kinds = {getattr(trt.LayerType, "PLUGIN_V3", None): "v3", getattr(trt.LayerType, "PLUGIN_V2", None): "v2"}
    kinds.pop(None, None)
    for index in range(network.num_layers):
        kind = kinds.get(network.get_layer(index).type)
        if kind:
            counts[kind] += 1
    return counts


def check_plugin_layers(counts: dict[str, int], expected: int, tensorrt_version: str = "?") -> None:
    if counts.get("v3", 0) == expected and not counts.get("v2", 0):
        return
    raise BuildError(
        f"TensorRT {tensorrt_version} parsed {counts.get('v3', 0)} plugin layers (and {counts.get('v2', 0)} legacy "
        f"ones) for the graph's {expected} VarlenAttention nodes: the parser inlined the local-function body for the "
        "rest, which builds a correct but slow engine, so the build stops. Check that TensorRT is >= 10.9 with "
        "tensorrt.plugin, that ettin_plugins registered before parsing (it does, in this build), and that every node "
        "carries plugin_namespace='ettin' and aot=1 (the parser-rules check above)."
    )


# --- versions and builder settings (pure) --------------------------------------------------------------------


def tensorrt_version_problem(version: str, has_plugin_module: bool, has_aot: bool) -> str | None:
    if version_tuple(version)[:2] < MIN_TENSORRT:
        return (f"TensorRT {version} is too old: the ahead-of-time Python plugins this engine is built with "
                f"(tensorrt.plugin.aot_impl) arrived in TensorRT {'.'.join(map(str, MIN_TENSORRT))}.")
    if not has_plugin_module:
        return (f"TensorRT {version} has no tensorrt.plugin module (Python plugins); reinstall TensorRT's "
                "Python package.")
    if not has_aot:
        return f"TensorRT {version}'s tensorrt.plugin has no aot_impl (ahead-of-time plugins)."
    return None


def builder_settings(tensorrt_version: str) -> dict:
    """How the network and builder are configured, as recorded in the manifest (build_engine applies
    exactly these)."""
    major = version_tuple(tensorrt_version)[0]
    return {
        # 10.x: ask for strong typing; 11.x: always strongly typed (the flag is deprecated and ignored).
        "strongly_typed": True,
        "strongly_typed_flag": major < 11,
        "parser_flags": list(PARSER_FLAGS),
        "tf32": False,  # fp32 islands (norm statistics, softmax, the score) stay IEEE fp32
        "precision": "as typed in the ONNX graph (bf16 weights and matmuls, fp32 islands)",
        "optimization_profiles": 1,
    }


def kernel_ptx_version(gpu, ptx_arch: str, triton_default: int | None = None) -> int:
    """The PTX ISA version (e.g. 84) to compile the plugin's kernels with: the highest that both this GPU's
    driver loads and Triton's bundled ptxas writes, and at least what the architecture needs (8.0 for
    sm_90a). Raises TensorRTUnavailable, saying which driver to install, when none fits.

    Triton writes the ISA of its bundled ptxas (triton 3.9: 9.4 for sm_90), which the common H100
    drivers (535, 550, 560: CUDA 12.2 - 12.6) refuse to load; nothing complains until the engine runs."""
    from ettin_plugins import aot
    from ettin_runtime.backends.tensorrt import cuda_version_text, driver_needed_for_ptx, highest_ptx_for_driver

    lowest = aot.min_ptx_version(ptx_arch)
    lowest_text = aot.ptx_version_text(lowest)
    needed = driver_needed_for_ptx(lowest_text)
    driver = f"{gpu.name}'s driver {gpu.driver_version or '(version unknown)'}"
    update = (f"Install an NVIDIA driver for CUDA {cuda_version_text(needed)} or newer (the data-center branches "
              "R535, R570 and R580 are all new enough), or run the build where one is installed.")
    if gpu.cuda_driver_version is None:
        raise TensorRTUnavailable(f"Could not read the CUDA version of {driver} (cuDriverGetVersion), so the PTX "
                                  f"ISA version it loads is unknown. {update}")
    try:
        driver_max = aot.ptx_version_number(highest_ptx_for_driver(gpu.cuda_driver_version))
    except ValueError as error:
        driver_max = 0
        reason = str(error)
    else:
        reason = f"it loads PTX ISA up to {aot.ptx_version_text(driver_max)}"
    if driver_max < lowest:
        raise TensorRTUnavailable(
            f"{driver} supports CUDA {gpu.cuda_version}: {reason}, but {ptx_arch} kernels need PTX ISA "
            f"{lowest_text} or newer. {update}")
    default = aot.triton_default_ptx_version(ptx_arch) if triton_default is None else triton_default
    if default < lowest:
        raise TensorRTUnavailable(
            f"This OpenAI Triton writes PTX ISA {aot.ptx_version_text(default)}, below the {lowest_text} that "
            f"{ptx_arch} needs. Install a supported one: pip install '{aot.TRITON_REQUIREMENT}'.")
    return min(default, driver_max)


def timing_cache_path(requested, tensorrt_version: str, compute_capability: str) -> Path:
    """The timing cache for this TensorRT release and GPU generation, beside `requested`: a cache
    written by another TensorRT or on another GPU makes the build fail ("the CUDA device property in
    the provided cache is different"), so each (version, capability) keeps its own file.
    `x.timing.cache` -> `x.trt10.9.0.34-cc9.0.timing.cache`."""
    requested = Path(requested)
    suffix = ".timing.cache"
    stem = requested.name[: -len(suffix)] if requested.name.endswith(suffix) else requested.name
    tag = re.sub(r"[^A-Za-z0-9.-]+", "-", f"trt{tensorrt_version}-cc{compute_capability}")
    return requested.with_name(f"{stem}.{tag}{suffix}")


def engine_facts(*, tensorrt_version: str, gpu, kernel, plugin_layers: dict, attention_nodes: int,
                 settings: dict, opset: int | None = None, timing_cache: dict | None = None,
                 build_seconds: float | None = None) -> dict:
    """The manifest's `engine` entry (format and file are added by the build)."""
    from ettin_plugins import aot, spec

    return {
        "external_data": None,
        "opset": opset,
        "onnxruntime_version": None,
        "tensorrt_version": str(tensorrt_version),
        "compute_capability": gpu.capability,
        "ptx_version": kernel.ptx_version,
        "ptx_target": kernel.target,
        "gpu_name": gpu.name,
        "driver_version": gpu.driver_version,
        "cuda_driver_version": gpu.cuda_driver_version,
        "plugin": spec.PLUGIN_ID,
        "plugin_layers": plugin_layers.get("v3", 0),
        "attention_nodes": attention_nodes,
        "triton_version": kernel.triton_version,
        "kernel_tactics": {str(t): asdict(c) for t, c in aot.TACTICS.items()},
        "builder": settings,
        "timing_cache": timing_cache,
        "build_seconds": None if build_seconds is None else round(build_seconds, 1),
    }


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
