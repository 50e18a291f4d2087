"""What a TensorRT build decides without TensorRT, as plain functions tested on a CPU: the engine's
optimization profile, the graph against the ONNX parser's rules (the plugin's registration signature,
the creators TensorRT registers under standard op names), plugin-layer counting on a parsed network,
version rules, builder settings, the PTX ISA choice, the timing cache's name and the manifest facts.
ettin_export.engine.tensorrt runs them around the real build."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

from ettin_runtime.artifact import Limits, Profile
from ettin_runtime.checks import whole_number

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
    if not whole_number(value, minimum=minimum):
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
