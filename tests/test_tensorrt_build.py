"""`build --target h100`: the profile, the graph against the TensorRT parser's plugin rules (read from
the plugin's registration), the preflight's messages, the command's early stop and `--onnx-only`.

Everything here runs without TensorRT or a GPU except the tests at the end, which skip with the
reason when either is missing (they never pretend)."""

from __future__ import annotations

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

from ettin_export import tensorrt_build as tb
from ettin_export.build import BuildError
from ettin_export.targets import get_target
from ettin_plugins import trt_plugin
from ettin_runtime.tensorrt_backend import GpuInfo, GpuUnavailable, driver_needed_for_ptx, environment_problems

H100 = get_target("h100")
REPO = Path(__file__).resolve().parents[1]
INSTALL = "pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com"
HOPPER = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "570.124.06", 12080)


def tensorrt_gpu_missing() -> str | None:
    """Why the real TensorRT tests cannot run here (None when they can)."""
    try:
        tb.preflight(H100)
    except tb.TensorRTUnavailable as error:
        return str(error).splitlines()[0]
    return None


# --- the optimization profile ----------------------------------------------------------------------------


def test_profile_covers_a_full_batch_of_full_length_pairs():
    limits = tb.engine_profile(64, 512)
    assert limits["max_batch_pairs"] == 64 and limits["max_batch_tokens"] == 64 * 512
    assert limits["profile"] == {"total_tokens": [1, 64 * 128, 64 * 512], "num_pairs_plus_1": [2, 65, 65]}
    assert tb.profile_shapes(limits) == {
        "input_ids": ((1,), (8192,), (32768,)), "cu_seqlens": ((2,), (65,), (65,)),
    }


def test_larger_token_budget_is_kept_and_short_pairs_set_the_opt_point():
    limits = tb.engine_profile(32, 96, max_batch_tokens=10_000)
    assert limits["max_batch_tokens"] == 10_000
    assert limits["profile"]["total_tokens"] == [1, 32 * 96, 10_000]  # opt: every pair at max_length < 128


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
        tb.engine_profile(*args)
    assert message in str(error.value)


# --- the bf16 graph against the parser's rules -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_graph(tmp_path_factory, tiny_checkpoint):
    """A real bf16 export of the tiny model (4 layers: global 0 and 3, local 1 and 2)."""
    import torch

    from ettin_export.checkpoint import load_checkpoint
    from ettin_export.onnx_export import export_onnx

    model = load_checkpoint(str(tiny_checkpoint)).build_model(torch.float32)
    exported = export_onnx(model, tmp_path_factory.mktemp("bf16") / "model.onnx", "bf16")
    return onnx.load(str(exported.path))


def _copy(proto):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def test_exported_graph_meets_the_rules_of_the_registered_plugin(bf16_graph):
    assert tb.parser_rule_problems(bf16_graph) == []
    assert tb.check_parser_rules(bf16_graph) == 4
    # The rules are those of the registration signature, which the exporter never reads.
    assert trt_plugin.registered_input_names() == ("q", "k", "v", "cu_seqlens")
    assert trt_plugin.registered_attribute_names() == ("window",)
    windows = sorted(helper.get_attribute_value(a) for n in tb.attention_nodes(bf16_graph)
                     for a in n.attribute if a.name == "window")
    assert windows == [-1, -1, 16, 16]


def test_rules_follow_the_registration_signature_not_the_exporter(bf16_graph, monkeypatch):
    monkeypatch.setattr(trt_plugin, "registered_attribute_names", lambda: ("window", "head_dim"))
    problems = tb.parser_rule_problems(bf16_graph)
    assert len(problems) == 4 and all("lacks attribute 'head_dim'" in p for p in problems)
    monkeypatch.setattr(trt_plugin, "registered_input_names", lambda: ("q", "k", "v", "cu_seqlens", "max_seqlen"))
    assert any("4 inputs, the plugin registers 5" in p for p in tb.parser_rule_problems(bf16_graph))


def _first_node(proto):
    return tb.attention_nodes(proto)[0]


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
    "fp32 q": (lambda p: _retype(p, _first_node(p).input[0], TensorProto.FLOAT), "is FLOAT; the plugin offers"),
    "no local function": (lambda p: p.ClearField("functions"), "lacks the local function ettin::VarlenAttention"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_the_same_check_fails_on_a_deliberately_broken_graph(bf16_graph, breakage):
    mutate, expected = BREAKAGES[breakage]
    broken = _copy(bf16_graph)
    mutate(broken)
    problems = tb.parser_rule_problems(broken)
    assert any(expected in p for p in problems), problems
    with pytest.raises(BuildError, match="does not meet the TensorRT parser's plugin rules"):
        tb.check_parser_rules(broken)


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
    counts = tb.count_plugin_layers(_Network(["matmul", "plugin_v3"] * 4), FAKE_TRT)
    assert counts == {"v3": 4, "v2": 0}
    tb.check_plugin_layers(counts, 4)


def test_an_inlined_body_stops_the_build():
    counts = tb.count_plugin_layers(_Network(["plugin_v3", "matmul", "matmul"]), FAKE_TRT)
    with pytest.raises(BuildError) as error:
        tb.check_plugin_layers(counts, 4, "10.15.1.29")
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
    problem = tb.tensorrt_version_problem(version, plugin, aot)
    assert (problem is None) if expected is None else (expected in problem)


def test_strong_typing_is_asked_for_on_10x_and_implied_on_11x():
    assert tb.builder_settings("10.9.0.34", has_plugin_override_flag=False)["strongly_typed_flag"] is True
    settings = tb.builder_settings("11.1.0.106", has_plugin_override_flag=True)
    assert settings["strongly_typed_flag"] is False and settings["strongly_typed"] is True
    assert settings["parser_flags"] == ["ENABLE_PLUGIN_OVERRIDE"] and settings["tf32"] is False


def test_manifest_facts_from_a_real_kernel_compile_satisfy_the_runtime_check():
    from ettin_plugins import aot

    kernel = aot.compile_varlen_attention("bf16", -1, 90, aot.TACTICS[min(aot.TACTICS)])
    limits = tb.engine_profile(64, 512)
    facts = tb.engine_facts(
        tensorrt_version="10.9.0.34", gpu=HOPPER, kernel=kernel, plugin_layers={"v3": 10, "v2": 0},
        attention_nodes=10, limits=limits, settings=tb.builder_settings("10.9.0.34", has_plugin_override_flag=False),
        opset=20,
    )
    assert facts["compute_capability"] == "9.0" and facts["ptx_target"] == "sm_90a"
    assert facts["ptx_version"] == kernel.ptx_version and facts["plugin"] == "ettin::VarlenAttention"
    assert facts["plugin_layers"] == facts["attention_nodes"] == 10 and facts["profile"] == limits["profile"]
    json.dumps(facts)  # goes into manifest.json as is
    # What the build records is what the runtime checks: the same machine passes.
    needed = driver_needed_for_ptx(kernel.ptx_version) or HOPPER.cuda_driver_version
    same_machine = GpuInfo(HOPPER.name, (9, 0), HOPPER.driver_version, max(needed, HOPPER.cuda_driver_version))
    assert environment_problems(facts, "10.9.0.34", same_machine) == []


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
             "gpu": HOPPER, "builder": None}

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
    monkeypatch.setattr(tb, "_check_polygraphy", lambda: None)
    monkeypatch.setattr(tb, "_torch_cuda", lambda: "torch.nn.attention.varlen")
    return state


def test_preflight_returns_facts_when_everything_is_there(fake_environment):
    facts = tb.preflight(H100)
    assert facts["tensorrt_version"] == "10.9.0.34" and facts["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert facts["compute_capability"] == "9.0" and facts["driver_version"] == "570.124.06"
    assert facts["cuda_driver_version"] == "12.8" and facts["triton_version"] == "3.6.0"


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
    with pytest.raises(tb.TensorRTUnavailable, match=r"(?s)OpenAI Triton is not installed.*pip install 'triton>=3.2'"):
        tb.preflight(H100)
    monkeypatch.setattr(tb, "_triton_version", lambda: "3.6.0")

    def no_cuda_torch():
        raise RuntimeError("PyTorch 2.13.0+cpu here sees no CUDA device")

    monkeypatch.setattr(tb, "_torch_cuda", no_cuda_torch)
    expected = r"(?s)here sees no CUDA device.*parity gate.*CUDA build of PyTorch"
    with pytest.raises(tb.TensorRTUnavailable, match=expected):
        tb.preflight(H100)


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
    from ettin_runtime.manifest import read_manifest

    out = tmp_path / "tiny-h100"
    args = ["build", str(tiny_checkpoint), "--target", "h100", "--onnx-only", "--out", str(out),
            "--skip-crossencoder-check", "--parity-queries", "2", "--max-batch-size", "16", "--max-length", "200"]
    proc, _ = _cli(args, tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(out)
    assert manifest.target == "h100" and manifest.precision == "bf16" and manifest.parity is None
    assert manifest.limits == tb.engine_profile(16, 200)
    assert tb.check_parser_rules(onnx.load(str(out / manifest.engine["file"]))) == 4
    finish = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("ettin-export build")]
    assert finish, proc.stderr
    assert finish[-1] == (f"ettin-export build {tiny_checkpoint} --target h100 --out {out} --skip-crossencoder-check "
                          "--parity-queries 2 --max-batch-size 16 --max-length 200 --force")
    assert manifest.engine["complete"] is False and manifest.engine["finish_command"] == finish[-1]
    from ettin_runtime import Reranker
    from ettin_runtime.manifest import ArtifactError

    with pytest.raises(ArtifactError, match="holds only the bf16 ONNX of a h100 build .* Finish it on a machine"):
        Reranker.load(out)


# --- needs TensorRT and the GPU: skipped with the reason otherwise ------------------------------------------------


def test_engine_build_and_gate_on_the_gpu(tmp_path, tiny_checkpoint):
    reason = tensorrt_gpu_missing()
    if reason:
        pytest.skip(f"needs TensorRT and an H100/H200: {reason}")
    from ettin_export.build import BuildOptions, run_build
    from ettin_export.checkpoint import load_checkpoint
    from ettin_runtime import Reranker
    from ettin_runtime.manifest import read_manifest

    out = tmp_path / "tiny-h100"
    options = BuildOptions(out=out, target=H100, max_length=200, max_batch_pairs=16, parity_queries=2,
                           check_crossencoder=False, quiet=True)
    assert run_build(lambda: load_checkpoint(str(tiny_checkpoint), max_length=200), options) == 0
    manifest = read_manifest(out)
    assert manifest.engine["plugin_layers"] == manifest.engine["attention_nodes"] == 4
    assert (tmp_path / "tiny-h100.timing.cache").is_file()
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
    from ettin_export import selftest

    compile(selftest.FRESH_PROCESS_SCRIPT, "<fresh process>", "exec")
    imported = {name.strip().split(".")[0] for line in selftest.FRESH_PROCESS_SCRIPT.splitlines()
                if line.startswith(("import ", "from ")) for name in line.split()[1].split(",") if name.strip()}
    assert imported == {"json", "numpy", "tensorrt", "polygraphy"}


def test_selftest_attention_accuracy_runs_on_a_cpu():
    """The kernel-parity helper's plumbing (the kernel itself needs CUDA: skipped inside, and said so)."""
    import torch

    from ettin_export.selftest import attention_accuracy

    result = attention_accuracy(torch, [1, 63, 64, 65], 64, torch.bfloat16, device="cpu", heads=2)
    assert result["implementation"] == {"auto": "reference (fp32 math)",
                                        "triton": "skipped: the Triton kernel needs a CUDA device"}
    assert 0 < result["errors"]["auto"] < 0.02 and 0 < result["errors"]["torch_sdpa_per_pair"] < 0.05
    assert "pass" not in result  # no kernel ran, so no verdict
    fp32 = attention_accuracy(torch, [3, 130], -1, torch.float32, device="cpu", heads=2)
    assert fp32["pass"] and fp32["errors"]["auto"] < 1e-5
