"""`build --target h100`: the profile, the graph against the TensorRT parser's plugin rules (read from
the plugin's registration), the preflight's messages, the command's early stop and `--onnx-only`.

Everything here runs without TensorRT or a GPU except the tests at the end, which skip with the
reason when either is missing (they never pretend)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from ettin_export.engine import rules
from ettin_export.engine import tensorrt as tb
from ettin_export.graph.validate import attention_nodes
from ettin_export.pipeline import BuildError
from ettin_export.targets import get_target
from ettin_plugins import trt_plugin
from ettin_runtime.backends.tensorrt import GpuInfo, GpuUnavailable, driver_needed_for_ptx, environment_problems

H100 = get_target("h100")
REPO = Path(__file__).resolve().parents[1]
INSTALL = "pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com"
HOPPER = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "570.124.06", 12080)
REAL_TRITON_VERSION = tb._triton_version


def tensorrt_gpu_missing() -> str | None:
    """Why the real TensorRT tests cannot run here (None when they can)."""
    try:
        tb.preflight(H100)
    except tb.TensorRTUnavailable as error:
        return str(error).splitlines()[0]
    return None


# --- the optimization profile ----------------------------------------------------------------------------


def test_profile_covers_a_full_batch_of_full_length_pairs():
    limits = rules.engine_profile(64, 512)
    assert limits.max_batch_pairs == 64 and limits.max_batch_tokens == 64 * 512
    assert limits.to_json()["profile"] == {"total_tokens": [1, 64 * 128, 64 * 512], "num_pairs_plus_1": [2, 65, 65]}
    assert limits.profile.shapes() == {
        "input_ids": ((1,), (8192,), (32768,)), "cu_seqlens": ((2,), (65,), (65,)),
    }


def test_larger_token_budget_is_kept_and_short_pairs_set_the_opt_point():
    limits = rules.engine_profile(32, 96, max_batch_tokens=10_000)
    assert limits.max_batch_tokens == 10_000
    assert limits.profile.tokens == (1, 32 * 96, 10_000)  # opt: every pair at max_length < 128


@pytest.mark.parametrize(("args", "message"), [
    ((64, 512, 1000), "--max-batch-tokens 1000 is below --max-batch-size x --max-length = 64 x 512 = 32768"),
    ((0, 512, None), "--max-batch-size must be an integer of at least 1; got 0"),
    (("64", 512, None), "--max-batch-size must be an integer of at least 1; got '64'"),
    ((True, 512, None), "--max-batch-size must be an integer"),
    ((64, 1, None), "--max-length must be an integer of at least 2"),
    ((64, 512, -5), "--max-batch-tokens must be an integer of at least 1"),
    ((4096, 8000, None), "more than 1048576"),
])
def test_profile_refuses_bad_limits_clearly(args, message):
    with pytest.raises(BuildError) as error:
        rules.engine_profile(*args)
    assert message in str(error.value)


# --- the bf16 graph against the parser's rules -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_onnx(tmp_path_factory, tiny_checkpoint):
    """A real bf16 export of the tiny model (4 layers: global 0 and 3, local 1 and 2), as a file."""
    import torch

    from ettin_export.checkpoint import load_checkpoint
    from ettin_export.graph.export import export_onnx

    model = load_checkpoint(str(tiny_checkpoint)).build_model(torch.float32)
    return export_onnx(model, tmp_path_factory.mktemp("bf16") / "model.onnx", "bf16").path


@pytest.fixture(scope="module")
def bf16_graph(bf16_onnx):
    return onnx.load(str(bf16_onnx))


def _copy(proto):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def test_exported_graph_meets_the_rules_of_the_registered_plugin(bf16_graph):
    assert rules.parser_rule_problems(bf16_graph) == []
    assert rules.check_parser_rules(bf16_graph) == 4
    # The rules are those of the registration signature, which the exporter never reads.
    assert trt_plugin.registered_input_names() == ("q", "k", "v", "cu_seqlens")
    assert trt_plugin.registered_attribute_names() == ("window",)
    windows = sorted(helper.get_attribute_value(a) for n in attention_nodes(bf16_graph)
                     for a in n.attribute if a.name == "window")
    assert windows == [-1, -1, 16, 16]


def test_rules_follow_the_registration_signature_not_the_exporter(bf16_graph, monkeypatch):
    monkeypatch.setattr(trt_plugin, "registered_attribute_names", lambda: ("window", "head_dim"))
    problems = rules.parser_rule_problems(bf16_graph)
    assert len(problems) == 4 and all("lacks attribute 'head_dim'" in p for p in problems)
    monkeypatch.setattr(trt_plugin, "registered_input_names", lambda: ("q", "k", "v", "cu_seqlens", "max_seqlen"))
    assert any("4 inputs, the op takes 5" in p for p in rules.parser_rule_problems(bf16_graph))


def _first_node(proto):
    return attention_nodes(proto)[0]


def _set_attribute(node, attribute):
    kept = [a for a in node.attribute if a.name != attribute.name]
    del node.attribute[:]
    node.attribute.extend(kept + [attribute])


def _drop_attribute(node, name):
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


def _retype(proto, tensor_name, elem_type):
    for value in list(proto.graph.input) + list(proto.graph.value_info):
        if value.name == tensor_name:
            value.type.tensor_type.elem_type = elem_type


BREAKAGES = {
    "no plugin_namespace": (lambda p: _drop_attribute(_first_node(p), "plugin_namespace"),
                            "no plugin_namespace attribute"),
    "other namespace": (lambda p: _set_attribute(_first_node(p), helper.make_attribute("plugin_namespace", "trt")),
                        "registered in namespace 'ettin'"),
    "aot off": (lambda p: _set_attribute(_first_node(p), helper.make_attribute("aot", 0)), "aot must be INT 1"),
    "no aot": (lambda p: _drop_attribute(_first_node(p), "aot"), "aot must be INT 1"),
    "window as float": (lambda p: _set_attribute(_first_node(p), helper.make_attribute("window", 64.0)),
                        "attribute 'window' is FLOAT"),
    "window missing": (lambda p: _drop_attribute(_first_node(p), "window"), "lacks attribute 'window'"),
    "window beyond int32": (lambda p: _set_attribute(_first_node(p), helper.make_attribute("window", 2**40)),
                            "does not fit int32"),
    "int64 cu_seqlens": (lambda p: _retype(p, "cu_seqlens", TensorProto.INT64), "cu_seqlens (cu_seqlens) is INT64"),
    "fp32 q": (lambda p: _retype(p, _first_node(p).input[0], TensorProto.FLOAT), "is FLOAT; this graph needs bfloat16 or float16"),
    "no local function": (lambda p: p.ClearField("functions"), "lacks the local function ettin::VarlenAttention"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_the_same_check_fails_on_a_deliberately_broken_graph(bf16_graph, breakage):
    mutate, expected = BREAKAGES[breakage]
    broken = _copy(bf16_graph)
    mutate(broken)
    problems = rules.parser_rule_problems(broken)
    assert any(expected in p for p in problems), problems
    with pytest.raises(BuildError, match="does not meet the TensorRT parser's plugin rules"):
        rules.check_parser_rules(broken)


# --- standard ops routed to TensorRT's own plugin creators (ENABLE_PLUGIN_OVERRIDE, plugin_namespace) -----------


def _first(proto, op_type):
    return next(n for n in proto.graph.node if n.op_type == op_type)


def test_the_exported_graph_routes_no_standard_op_to_a_tensorrt_creator(bf16_graph):
    # The graph does hold ops that TensorRT registers creators for under the same name in namespace "":
    # the check below is about routing, not about their absence.
    present = {n.op_type for n in bf16_graph.graph.node} & set(rules.STANDARD_NAME_CREATORS)
    assert present == {"ScatterElements", "Split"}
    assert rules.PARSER_FLAGS == () and rules.builder_settings("10.15.1.29")["parser_flags"] == []
    assert rules.plugin_routing_problems(bf16_graph, rules.PARSER_FLAGS) == []
    assert rules.check_parser_rules(bf16_graph) == 4


def test_the_override_flag_would_hand_scatter_elements_to_the_legacy_plugin(bf16_graph):
    problems = rules.plugin_routing_problems(bf16_graph, ("ENABLE_PLUGIN_OVERRIDE",))
    routed = sorted(p.split(" (")[1].split(")")[0] for p in problems)
    assert routed == ["ScatterElements"] + ["Split"] * 4
    assert all("ENABLE_PLUGIN_OVERRIDE" in p and "namespace ''" in p for p in problems)
    with pytest.raises(BuildError, match="ScatterElements.*TensorRT's own ScatterElements plugin creator"):
        rules.check_parser_rules(bf16_graph, ("ENABLE_PLUGIN_OVERRIDE",))


@pytest.mark.parametrize(("namespace", "collides"), [("", True), ("ettin", False)])
def test_a_standard_node_carrying_plugin_namespace_is_routed_too(bf16_graph, namespace, collides):
    graph = _copy(bf16_graph)
    node = _first(graph, "ScatterElements")
    node.attribute.append(helper.make_attribute("plugin_namespace", namespace))
    problems = rules.plugin_routing_problems(graph, rules.PARSER_FLAGS)
    assert bool(problems) == collides, problems
    if collides:
        (problem,) = problems
        assert f"{node.name} (ScatterElements): its plugin_namespace attribute" in problem
        with pytest.raises(BuildError, match="does not meet the TensorRT parser's plugin rules"):
            rules.check_parser_rules(graph)


# --- plugin layers in the parsed network (TensorRT objects faked) ------------------------------------------------


FAKE_TRT = types.SimpleNamespace(LayerType=types.SimpleNamespace(PLUGIN_V3="plugin_v3", PLUGIN_V2="plugin_v2",
                                                                  MATRIX_MULTIPLY="matmul"))


class _Network:
    def __init__(self, kinds):
        self.layers = [types.SimpleNamespace(type=k) for k in kinds]
        self.num_layers = len(self.layers)

    def get_layer(self, index):
        return self.layers[index]


def test_one_plugin_layer_per_node_passes():
    counts = rules.count_plugin_layers(_Network(["matmul", "plugin_v3"] * 4), FAKE_TRT)
    assert counts == {"v3": 4, "v2": 0}
    rules.check_plugin_layers(counts, 4)


def test_an_inlined_body_stops_the_build():
    counts = rules.count_plugin_layers(_Network(["plugin_v3", "matmul", "matmul"]), FAKE_TRT)
    with pytest.raises(BuildError) as error:
        rules.check_plugin_layers(counts, 4, "10.15.1.29")
    assert "parsed 1 plugin layers" in str(error.value) and "4 VarlenAttention nodes" in str(error.value)
    assert "inlined the local-function body" in str(error.value)


# --- versions, settings and manifest facts ---------------------------------------------------------------------


@pytest.mark.parametrize(("version", "plugin", "aot", "expected"), [
    ("10.8.0.43", True, False, "too old"),
    ("10.9.0.34", False, False, "no tensorrt.plugin module"),
    ("10.9.0.34", True, False, "has no aot_impl"),
    ("10.9.0.34", True, True, None),
    ("11.1.0.106", True, True, None),
])
def test_tensorrt_version_rules(version, plugin, aot, expected):
    problem = rules.tensorrt_version_problem(version, plugin, aot)
    assert (problem is None) if expected is None else (expected in problem)


# --- the PTX ISA version: what the driver loads, what Triton writes, what sm_90a needs -------------------------

# Driver branches as H100 machines run them, with the CUDA version their driver reports (cuDriverGetVersion).
DRIVERS = {
    "535.183.01": 12020, "550.54.15": 12040, "560.35.03": 12060, "565.57.01": 12070, "570.124.06": 12080,
    "575.57.08": 12090, "580.65.06": 13000,
}


@pytest.mark.parametrize(("driver", "triton_default", "expected"), [
    # triton 3.9's bundled ptxas (CUDA 13.4) writes 9.4: the driver decides
    ("535.183.01", 94, 82), ("550.54.15", 94, 84), ("560.35.03", 94, 85), ("565.57.01", 94, 86),
    ("570.124.06", 94, 87), ("575.57.08", 94, 88), ("580.65.06", 94, 90),
    # an older Triton (ptxas of CUDA 12.4 writes 8.4): it decides on the newer drivers
    ("535.183.01", 84, 82), ("570.124.06", 84, 84), ("580.65.06", 84, 84),
])
def test_ptx_version_is_the_lower_of_driver_and_triton(driver, triton_default, expected):
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), driver, DRIVERS[driver])
    assert rules.kernel_ptx_version(gpu, "sm_90a", triton_default) == expected


@pytest.mark.parametrize(("cuda", "message"), [
    (11080, "supports CUDA 11.8: it loads PTX ISA up to 7.8, but sm_90a kernels need PTX ISA 8.0"),
    (11040, "older than every PTX ISA version known here"),
    (None, "Could not read the CUDA version"),
])
def test_no_ptx_version_fits_an_old_driver(cuda, message):
    gpu = GpuInfo("NVIDIA H100 PCIe", (9, 0), "520.61.05", cuda)
    with pytest.raises(tb.TensorRTUnavailable, match=message) as error:
        rules.kernel_ptx_version(gpu, "sm_90a", 94)
    assert "Install an NVIDIA driver for CUDA 12.0 or newer" in str(error.value)


def test_a_triton_below_the_architecture_is_refused():
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "570.124.06", 12080)
    with pytest.raises(tb.TensorRTUnavailable, match=r"writes PTX ISA 7.8, below the 8.0 that sm_90a needs"):
        rules.kernel_ptx_version(gpu, "sm_90a", 78)


def test_the_chosen_ptx_loads_on_the_driver_it_was_chosen_for():
    """The build's choice and the runtime's refusal read one table: never refused on its own machine,
    always refused on the next older driver branch."""
    from ettin_runtime.backends.tensorrt import driver_needed_for_ptx

    from ettin_plugins import aot

    versions = sorted(DRIVERS.values())
    for older, cuda in zip([None, *versions], versions):
        chosen = aot.ptx_version_text(rules.kernel_ptx_version(GpuInfo("H100", (9, 0), None, cuda), "sm_90a", 94))
        assert driver_needed_for_ptx(chosen) <= cuda
        assert older is None or driver_needed_for_ptx(chosen) > older


def test_timing_cache_is_named_by_tensorrt_version_and_compute_capability(tmp_path):
    requested = tmp_path / "1b-h100.timing.cache"
    paths = {(v, cc): rules.timing_cache_path(requested, v, cc)
             for v in ("10.9.0.34", "10.13.3.9", "11.1.0.106") for cc in ("9.0", "8.9")}
    assert len(set(paths.values())) == len(paths)  # no two releases or GPU generations share a cache
    assert all(p.parent == tmp_path and p.name.startswith("1b-h100.") and p.name.endswith(".timing.cache")
               for p in paths.values())
    assert paths[("10.9.0.34", "9.0")].name == "1b-h100.trt10.9.0.34-cc9.0.timing.cache"
    assert rules.timing_cache_path(requested, "10.9.0.34", "9.0") == paths[("10.9.0.34", "9.0")]  # stable


def test_manifest_facts_from_a_real_kernel_compile_satisfy_the_runtime_check():
    from ettin_plugins import aot

    kernel = aot.compile_varlen_attention("bf16", -1, 90, aot.TACTICS[min(aot.TACTICS)])
    facts = rules.engine_facts(
        tensorrt_version="10.9.0.34", gpu=HOPPER, kernel=kernel, plugin_layers={"v3": 10, "v2": 0},
        attention_nodes=10, settings=rules.builder_settings("10.9.0.34"), opset=20,
    )
    assert facts["compute_capability"] == "9.0" and facts["ptx_target"] == "sm_90a"
    assert facts["ptx_version"] == kernel.ptx_version and facts["plugin"] == "ettin::VarlenAttention"
    assert facts["plugin_layers"] == facts["attention_nodes"] == 10
    json.dumps(facts)  # goes into manifest.json as is
    from ettin_runtime.artifact import Engine

    engine = Engine.from_json({"format": "tensorrt", "file": "model.plan", **facts})  # what the build records
    assert engine.tensorrt.ptx_version == kernel.ptx_version and engine.record["builder"] == facts["builder"]
    # What the build records is what the runtime checks: the same machine passes.
    needed = driver_needed_for_ptx(kernel.ptx_version) or HOPPER.cuda_driver_version
    same_machine = GpuInfo(HOPPER.name, (9, 0), HOPPER.driver_version, max(needed, HOPPER.cuda_driver_version))
    assert environment_problems(engine.tensorrt, "10.9.0.34", same_machine) == []


# --- the preflight ---------------------------------------------------------------------------------------------------


def test_preflight_without_tensorrt_fails_within_seconds_saying_how_to_get_it():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; the stand-in test below covers the message")
    except (ImportError, OSError):
        pass
    start = time.perf_counter()
    with pytest.raises(tb.TensorRTUnavailable) as error:
        tb.preflight(H100)
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "TensorRT is not installed here" in message and INSTALL in message
    assert ">= 10.9" in message and "--onnx-only" in message


class _FakeTensorRT(types.SimpleNamespace):
    pass


@pytest.fixture
def fake_environment(monkeypatch):
    """A machine with TensorRT 10.9, an H100, Triton, polygraphy and PyTorch-CUDA, all stand-ins."""
    state = {"trt": _FakeTensorRT(__version__="10.9.0.34"), "trtp": types.SimpleNamespace(aot_impl=object()),
             "gpu": HOPPER, "builder": None, "triton_ptx": 94}

    def import_modules():
        if isinstance(state["trt"], Exception):
            raise state["trt"]
        return state["trt"], state["trtp"]

    def probe():
        if isinstance(state["gpu"], Exception):
            raise state["gpu"]
        return state["gpu"]

    monkeypatch.setattr(tb, "_import_tensorrt_modules", import_modules)
    monkeypatch.setattr(tb, "_probe_gpu", probe)
    monkeypatch.setattr(tb, "_builder_error", lambda trt: state["builder"])
    monkeypatch.setattr(tb, "_triton_version", lambda: "3.6.0")
    monkeypatch.setattr(tb, "_triton_default_ptx", lambda arch: state["triton_ptx"])
    monkeypatch.setattr(tb, "_check_polygraphy", lambda: None)
    monkeypatch.setattr(tb, "_torch_cuda", lambda: "torch.nn.attention.varlen")
    return state


@pytest.mark.parametrize(("driver", "triton_ptx", "ptx"), [
    ("535.183.01", 94, "8.2"), ("560.35.03", 94, "8.5"), ("570.124.06", 94, "8.7"), ("570.124.06", 84, "8.4"),
])
def test_preflight_chooses_the_ptx_version_for_this_driver(fake_environment, driver, triton_ptx, ptx):
    fake_environment.update(gpu=GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), driver, DRIVERS[driver]),
                            triton_ptx=triton_ptx)
    facts = tb.preflight(H100)
    assert facts["ptx_version"] == ptx and facts["driver_version"] == driver
    assert facts["cuda_driver_version"] == f"{DRIVERS[driver] // 1000}.{DRIVERS[driver] % 1000 // 10}"
    assert "warnings" not in facts and facts["preflight_s"] < 1


def test_preflight_warns_on_the_tensorrt_releases_that_leak_per_shape_change(fake_environment):
    for version, leaks in (("11.0.0.114", False), ("11.1.0.106", True), ("11.2.1.2", True), ("11.3.0.99", False)):
        fake_environment["trt"] = _FakeTensorRT(__version__=version)
        warnings = tb.preflight(H100).get("warnings", [])
        assert bool(warnings) == leaks, version
        assert not leaks or "NVIDIA/TensorRT#4849" in warnings[0]


def test_preflight_stops_on_a_driver_too_old_for_any_ptx(fake_environment):
    fake_environment["gpu"] = GpuInfo("NVIDIA H100 PCIe", (9, 0), "520.61.05", 11080)
    start = time.perf_counter()
    with pytest.raises(tb.TensorRTUnavailable, match="need PTX ISA 8.0 or newer.*CUDA 12.0 or newer"):
        tb.preflight(H100)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize(("change", "expected"), [
    ({"trt": ImportError("No module named 'tensorrt'")}, ["TensorRT is not installed here", INSTALL]),
    ({"trt": OSError("libnvinfer.so.10: cannot open shared object file")}, ["libnvinfer.so.10", INSTALL]),
    ({"trt": _FakeTensorRT(__version__="10.8.0.43")}, ["TensorRT 10.8.0.43 is too old", "arrived in TensorRT 10.9"]),
    ({"trtp": None}, ["no tensorrt.plugin module"]),
    ({"gpu": GpuUnavailable("no NVIDIA driver here (libcuda.so.1 cannot be loaded)")},
     ["No CUDA GPU is usable here", "libcuda.so.1", "--onnx-only"]),
    ({"builder": "pybind11::init(): factory function returned nullptr"},
     ["cannot use the GPU (NVIDIA H100 80GB HBM3)", "factory function returned nullptr", "CUDA 12.8"]),
    ({"gpu": GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), "550.54.15", 12040)},
     ["This GPU is NVIDIA A100-SXM4-80GB (compute capability 8.0)", "builds for compute capability 9.0", "sm_90a"]),
])
def test_preflight_names_what_is_missing(fake_environment, change, expected):
    fake_environment.update(change)
    start = time.perf_counter()
    with pytest.raises(tb.TensorRTUnavailable) as error:
        tb.preflight(H100)
    assert time.perf_counter() - start < 1
    for text in expected:
        assert text in str(error.value)


def test_preflight_checks_triton_then_the_build_pieces(fake_environment, monkeypatch):
    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(tb, "_triton_version", no_triton)
    with pytest.raises(tb.TensorRTUnavailable,
                       match=r"(?s)OpenAI Triton is not installed.*pip install 'triton>=3.3,<3.10'"):
        tb.preflight(H100)
    monkeypatch.setattr(tb, "_triton_version", lambda: "3.6.0")

    def no_cuda_torch():
        raise RuntimeError("PyTorch 2.13.0+cpu here sees no CUDA device")

    monkeypatch.setattr(tb, "_torch_cuda", no_cuda_torch)
    expected = r"(?s)here sees no CUDA device.*parity gate.*CUDA build of PyTorch"
    with pytest.raises(tb.TensorRTUnavailable, match=expected):
        tb.preflight(H100)


@pytest.mark.parametrize("version", ["3.2.0", "3.10.0"])
def test_preflight_refuses_a_triton_outside_the_supported_range(fake_environment, monkeypatch, version):
    triton = pytest.importorskip("triton", reason="OpenAI Triton is not installed: pip install triton")
    monkeypatch.setattr(tb, "_triton_version", REAL_TRITON_VERSION)  # the real check, on a stand-in version
    monkeypatch.setattr(triton, "__version__", version)
    with pytest.raises(tb.TensorRTUnavailable,
                       match=rf"(?s)Triton {version} is outside the range .*pip install 'triton>=3.3,<3.10'"):
        tb.preflight(H100)


# --- build_engine's calls into TensorRT and polygraphy (both stand-ins that record what they are given) -------------


class _Steps:
    def __init__(self):
        self.notes = []

    @contextlib.contextmanager
    def step(self, description):
        yield

    def note(self, text):
        self.notes.append(text)


@pytest.fixture
def recording_tensorrt(monkeypatch):
    """tensorrt (whose OnnxParserFlag does have ENABLE_PLUGIN_OVERRIDE) and polygraphy's TensorRT loaders,
    recording every call build_engine makes; the network has one plugin layer per VarlenAttention node."""
    calls = {"parse": [], "config": [], "build": [], "register": []}
    trt = types.SimpleNamespace(
        __version__="10.15.1.29",
        OnnxParserFlag=types.SimpleNamespace(ENABLE_PLUGIN_OVERRIDE="ENABLE_PLUGIN_OVERRIDE_FLAG"),
        LayerType=types.SimpleNamespace(PLUGIN_V3="plugin_v3", PLUGIN_V2="plugin_v2"),
    )

    class Profile(dict):
        def add(self, name, min, opt, max):  # noqa: A002 - polygraphy's names
            self[name] = (min, opt, max)
            return self

    def network_from_onnx_path(path, flags=None, strongly_typed=False):
        calls["parse"].append({"path": path, "flags": flags, "strongly_typed": strongly_typed})
        return None, _Network(["matmul", "plugin_v3"] * 4), None

    def create_config(**kwargs):
        calls["config"].append(kwargs)
        return kwargs

    def engine_bytes_from_network(network, config, save_timing_cache):
        calls["build"].append(save_timing_cache)
        Path(save_timing_cache).write_bytes(b"timing cache")
        return b"plan"

    @contextlib.contextmanager
    def verbosity(level):
        yield

    polygraphy = {
        "polygraphy.backend.trt": types.SimpleNamespace(
            CreateConfig=create_config, Profile=Profile, engine_bytes_from_network=engine_bytes_from_network,
            network_from_onnx_path=network_from_onnx_path),
        "polygraphy.exception": types.SimpleNamespace(PolygraphyException=type("PolygraphyError", (Exception,), {})),
        "polygraphy.logger": types.SimpleNamespace(G_LOGGER=types.SimpleNamespace(WARNING=2, verbosity=verbosity)),
    }
    for name, module in polygraphy.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(tb, "_import_tensorrt_modules", lambda: (trt, None))
    monkeypatch.setattr(tb, "_probe_gpu", lambda: HOPPER)  # a CUDA 12.8 driver
    monkeypatch.setattr(tb, "_triton_default_ptx", lambda arch: 94)  # triton 3.9's bundled ptxas
    monkeypatch.setattr(trt_plugin, "register", lambda target, ptx_version=None: calls["register"].append(
        (target, ptx_version)))
    return trt, calls


@pytest.mark.parametrize(("version", "strongly_typed_flag"), [("10.15.1.29", True), ("11.1.0.106", False)])
def test_build_engine_sets_no_parser_flag_and_asks_for_strong_typing_only_on_10x(
        recording_tensorrt, bf16_onnx, tmp_path, version, strongly_typed_flag):
    trt, calls = recording_tensorrt
    trt.__version__ = version
    steps = _Steps()
    limits = rules.engine_profile(16, 200)
    facts = tb.build_engine(bf16_onnx, tmp_path / "model.plan", limits, H100, tmp_path / "x.timing.cache", steps)
    (parse,) = calls["parse"]
    assert parse["flags"] is None  # no ENABLE_PLUGIN_OVERRIDE, although this TensorRT has the flag
    assert parse["strongly_typed"] is strongly_typed_flag
    assert facts["builder"]["parser_flags"] == [] and facts["builder"]["strongly_typed_flag"] is strongly_typed_flag
    assert calls["config"][0]["tf32"] is False and calls["config"][0]["profiles"][0] == dict(limits.profile.shapes())
    # The plugin's aot_impl and the manifest's own compile use the one PTX ISA: 8.7 for this 12.8 driver.
    assert calls["register"] == [("sm_90a", 87)]
    assert facts["ptx_version"] == "8.7" and facts["ptx_target"] == "sm_90a"
    assert (tmp_path / "model.plan").read_bytes() == b"plan" and facts["plugin_layers"] == facts["attention_nodes"] == 4
    warned = any("NVIDIA/TensorRT#4849" in note for note in steps.notes)
    assert warned is version.startswith("11.1")


def test_build_engine_keeps_one_timing_cache_per_tensorrt_release_and_gpu(recording_tensorrt, bf16_onnx, tmp_path):
    trt, calls = recording_tensorrt
    requested = tmp_path / "x.timing.cache"
    limits = rules.engine_profile(16, 200)
    runs = []
    for version in ("10.15.1.29", "10.15.1.29", "11.1.0.106"):
        trt.__version__ = version
        facts = tb.build_engine(bf16_onnx, tmp_path / "model.plan", limits, H100, requested, _Steps())
        runs.append((facts["timing_cache"]["path"], facts["timing_cache"]["reused"]))
    assert [reused for _, reused in runs] == [False, True, False]  # the 11.1 build does not read 10.15's cache
    assert runs[0][0] == runs[1][0] != runs[2][0]
    assert calls["build"] == [path for path, _ in runs]
    assert [c["load_timing_cache"] for c in calls["config"]] == [path for path, _ in runs]
    assert not requested.exists() and all("cc9.0" in path for path, _ in runs)


# --- the command ----------------------------------------------------------------------------------------------------


def _cli(args, cwd, cache, timeout=600):
    env = {**os.environ, "ETTIN_EXPORT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ettin_export.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def test_build_h100_without_tensorrt_stops_before_any_long_work(tmp_path):
    reason = tensorrt_gpu_missing()
    if reason is None:
        pytest.skip("TensorRT and the GPU are here: the build would run for real")
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc, seconds = _cli(["build", "--size", "17m", "--random-weights", "--target", "h100", "--out", str(out)],
                         tmp_path, cache)
    assert proc.returncode == 2, proc.stderr
    assert seconds < 60  # interpreter + torch import; the preflight itself takes milliseconds
    assert reason in proc.stderr and "--onnx-only" in proc.stderr
    assert not out.exists() and not cache.exists()  # no output folder, not even a random checkpoint made


def test_onnx_only_writes_the_bf16_graph_and_the_finish_command(tmp_path, tiny_checkpoint):
    from ettin_runtime import Artifact

    out = tmp_path / "tiny-h100"
    args = ["build", str(tiny_checkpoint), "--target", "h100", "--onnx-only", "--out", str(out),
            "--skip-crossencoder-check", "--parity-queries", "2", "--max-batch-size", "16", "--max-length", "200"]
    proc, _ = _cli(args, tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    manifest = Artifact.open(out)
    assert manifest.target == "h100" and manifest.precision == "bf16" and manifest.parity is None
    assert manifest.limits == rules.engine_profile(16, 200)
    assert rules.check_parser_rules(onnx.load(str(out / manifest.engine.file))) == 4
    finish = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("ettin-export build")]
    assert finish, proc.stderr
    assert finish[-1] == (f"ettin-export build {tiny_checkpoint} --target h100 --out {out} --skip-crossencoder-check "
                          "--parity-queries 2 --max-batch-size 16 --max-length 200 --force")
    assert manifest.engine.complete is False and manifest.engine.finish_command == finish[-1]
    from ettin_runtime import ArtifactError, Reranker

    with pytest.raises(ArtifactError, match="holds only the bf16 ONNX of a h100 build .* Finish it on a machine"):
        Reranker.load(out)


# --- needs TensorRT and the GPU: skipped with the reason otherwise ------------------------------------------------


def test_engine_build_and_gate_on_the_gpu(tmp_path, tiny_checkpoint):
    reason = tensorrt_gpu_missing()
    if reason:
        pytest.skip(f"needs TensorRT and an H100/H200: {reason}")
    from ettin_export.pipeline import BuildOptions, run_build
    from ettin_export.checkpoint import load_checkpoint
    from ettin_runtime import Artifact, Reranker

    out = tmp_path / "tiny-h100"
    options = BuildOptions(out=out, target=H100, max_length=200, max_batch_pairs=16, parity_queries=2,
                           check_crossencoder=False, quiet=True)
    assert run_build(lambda: load_checkpoint(str(tiny_checkpoint), max_length=200), options) == 0
    manifest = Artifact.open(out)
    assert manifest.engine.tensorrt.plugin_layers == manifest.engine.tensorrt.attention_nodes == 4
    assert (tmp_path / f"tiny-h100.trt{manifest.engine.tensorrt.tensorrt_version}-cc9.0.timing.cache").is_file()
    reranker = Reranker.load(out)
    assert reranker.predict([("a query", "a document")]).dtype.name == "float32"


# --- `ettin-export selftest` --------------------------------------------------------------------------------------


def test_selftest_without_tensorrt_exits_2_within_seconds_with_the_preflight_message(tmp_path):
    reason = tensorrt_gpu_missing()
    if reason is None:
        pytest.skip("TensorRT and the GPU are here: the selftest would run for real")
    proc, seconds = _cli(["selftest", "--target", "h100"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 2 and seconds < 60
    assert "cannot run on this machine" in proc.stderr and reason in proc.stderr
    assert not (tmp_path / "cache").exists()
    proc, _ = _cli(["selftest", "--target", "cpu"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 2 and "not a TensorRT target" in proc.stderr


def test_selftest_fresh_process_script_imports_nothing_of_the_project():
    from ettin_export.commands import selftest

    compile(selftest.FRESH_PROCESS_SCRIPT, "<fresh process>", "exec")
    imported = {name.strip().split(".")[0] for line in selftest.FRESH_PROCESS_SCRIPT.splitlines()
                if line.startswith(("import ", "from ")) for name in line.split()[1].split(",") if name.strip()}
    assert imported == {"json", "numpy", "tensorrt", "polygraphy"}


def test_selftest_attention_accuracy_runs_on_a_cpu():
    """The kernel-parity helper's plumbing (the kernel itself needs CUDA: skipped inside, and said so)."""
    import torch

    from ettin_export.parity.kernel import attention_accuracy

    result = attention_accuracy(torch, [1, 63, 64, 65], 64, torch.bfloat16, device="cpu", heads=2)
    assert result["implementation"] == {"auto": "reference (fp32 math)",
                                        "triton": "skipped: the Triton kernel needs a CUDA device"}
    assert 0 < result["errors"]["auto"] < 0.02 and 0 < result["errors"]["torch_sdpa"] < 0.05
    assert "pass" not in result  # no kernel ran, so no verdict
    fp32 = attention_accuracy(torch, [3, 130], -1, torch.float32, device="cpu", heads=2)
    assert fp32["pass"] and fp32["errors"]["auto"] < 1e-5


def test_selftest_verdict_names_driver_ptx_and_tensorrt_warnings():
    from ettin_export.commands.selftest import CHECKS, format_verdict
    from ettin_runtime.backends.tensorrt import tensorrt_version_warnings

    warnings = tensorrt_version_warnings("11.1.0.106")
    results = {"environment": {"gpu_name": "NVIDIA H100 80GB HBM3", "driver_version": "550.54.15",
                               "cuda_driver_version": "12.4", "tensorrt_version": "11.1.0.106", "ptx_version": "8.4",
                               "warnings": warnings},
               "checks": {name: {"status": "PASS", "detail": "ok"} for name in CHECKS}, "passed": True, "seconds": 1.0}
    verdict = format_verdict(results, H100, "17m")
    assert "driver 550.54.15, CUDA 12.4" in verdict and "PTX ISA 8.4" in verdict
    assert warnings and f"WARNING: {warnings[0]}" in verdict and verdict.endswith("SELFTEST PASSED (1.0 s)")
