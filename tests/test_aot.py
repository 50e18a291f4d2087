"""The AOT compile step (PTX for sm_90a on a CPU) and the tensorrt.plugin adapter's contract."""

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from ettin_plugins import aot, spec, trt_plugin  # neither imports triton or tensorrt until used


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(
    not _has_triton(), reason="OpenAI Triton is not installed: pip install triton (or the `kernel` extra)"
)

# --- the tensorrt.plugin adapter: importable and readable without TensorRT ---------------------------


def test_registered_names_match_the_spec():
    # The exporter's ONNX node is checked against registered_attribute_names(), which reads the very
    # function handed to trtp.register; this keeps that function and the shared spec in step.
    assert trt_plugin.registered_attribute_names() == spec.ATTRIBUTES
    assert trt_plugin.registered_input_names() == spec.INPUTS


def test_register_without_tensorrt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(ImportError, match=r"pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com"):
        trt_plugin.register()


@pytest.fixture(scope="module")
def local_bf16():
    pytest.importorskip("triton", reason="OpenAI Triton is not installed: pip install triton")
    return aot.compile_varlen_attention("bf16", 64, "sm_90a")


@pytest.fixture(scope="module")
def global_bf16():
    pytest.importorskip("triton", reason="OpenAI Triton is not installed: pip install triton")
    return aot.compile_varlen_attention("bf16", -1, "h100")


def test_ptx_is_for_hopper(local_bf16, global_bf16):
    for kernel in (local_bf16, global_bf16):
        assert re.search(r"^\.target sm_90a\b", kernel.ptx, flags=re.MULTILINE)
        assert kernel.target == "sm_90a"
        assert re.search(rf"^\.version {re.escape(kernel.ptx_version)}$", kernel.ptx, flags=re.MULTILINE)
        assert "wgmma" in kernel.ptx  # Hopper tensor-core MMAs, not a scalar fallback


def test_entry_name_and_declared_parameters_lead_the_entry(local_bf16):
    name, entry = aot.parse_entry(local_bf16.ptx)
    assert name == local_bf16.name == "varlen_attention_kernel"
    declared = local_bf16.params
    assert [p.name for p in declared] == ["q_ptr", "k_ptr", "v_ptr", "cu_seqlens_ptr", "num_pairs", "out_ptr"]
    assert [p.role for p in declared] == ["input"] * 4 + ["scalar", "output"]
    assert [p.triton_type for p in declared] == ["*bf16", "*bf16", "*bf16", "*i32", "i32", "*bf16"]
    ptx_types = [t for t, _ in entry[: len(declared)]]
    assert ptx_types == ["u64", "u64", "u64", "u64", "u32", "u64"]
    assert [n for _, n in entry] == [f"{name}_param_{i}" for i in range(len(entry))]


def test_hidden_trailing_parameters_are_unused_pointers(local_bf16, global_bf16):
    for kernel in (local_bf16, global_bf16):
        check = aot.verify_entry(kernel)
        assert check.declared == ("u64", "u64", "u64", "u64", "u32", "u64")
        assert all(t == "u64" for t in check.hidden)
        assert kernel.scratch == {"global_scratch_size": 0, "profile_scratch_size": 0}
        assert "make_tensor_descriptor" not in kernel.ptx and "atom." not in kernel.ptx


def test_verify_entry_rejects_a_body_that_reads_a_hidden_parameter(local_bf16):
    _, entry = aot.parse_entry(local_bf16.ptx)
    if len(entry) == len(local_bf16.params):
        pytest.skip(f"triton {local_bf16.triton_version} adds no hidden parameters to check")
    hidden_name = entry[-1][1]
    body_start = local_bf16.ptx.index("{", local_bf16.ptx.index(".entry"))
    ptx = local_bf16.ptx[: body_start + 1] + f"\n\tld.param.b64 %rd999, [{hidden_name}];" + local_bf16.ptx[body_start + 1:]
    with pytest.raises(aot.AotContractError, match="reads hidden parameter"):
        aot.verify_entry(dataclasses.replace(local_bf16, ptx=ptx))


def test_verify_entry_rejects_scratch_type_mismatch_and_big_shared_memory(local_bf16):
    with pytest.raises(aot.AotContractError, match="scratch"):
        aot.verify_entry(dataclasses.replace(local_bf16, scratch={"global_scratch_size": 128}))
    swapped = list(local_bf16.params)
    swapped[3], swapped[4] = swapped[4], swapped[3]  # scalar where the PTX has a pointer
    with pytest.raises(aot.AotContractError, match="disagree"):
        aot.verify_entry(dataclasses.replace(local_bf16, params=tuple(swapped)))
    too_big = dataclasses.replace(local_bf16.launch, shared_mem=aot.SHARED_MEM_LIMIT + 1)
    with pytest.raises(aot.AotContractError, match="shared memory"):
        aot.verify_entry(dataclasses.replace(local_bf16, launch=too_big))


def test_launch_formulas_come_from_shapes(local_bf16):
    launch = local_bf16.launch
    assert launch.block() == (local_bf16.config.num_warps * 32, 1, 1)
    total, pairs, heads = aot.shape_values((1000, 12, 64), (5,))
    assert (total, pairs, heads) == (1000, 4, 12)
    assert launch.grid(total, pairs, heads) == (-(-1000 // local_bf16.config.block_m) + 4, 12, 1)
    assert launch.scalar_args(total, pairs, heads) == (4,)
    assert 0 < launch.shared_mem <= aot.SHARED_MEM_LIMIT


@requires_triton
@pytest.mark.parametrize("tactic", sorted(aot.TACTICS))
def test_every_tactic_compiles_within_the_launch_limits(tactic):
    for dtype, window in (("bf16", 64), ("fp16", -1)):
        kernel = aot.compile_varlen_attention(dtype, window, "sm_90a", aot.TACTICS[tactic])
        aot.verify_entry(kernel)
        assert kernel.params[0].triton_type == f"*{dtype}"


@requires_triton
def test_fp32_compiles_with_ieee_products():
    kernel = aot.compile_varlen_attention("fp32", 3, "sm_90a", aot.KernelConfig(64, 32, 4, 2))
    aot.verify_entry(kernel)
    assert "tf32" not in kernel.ptx  # IEEE fp32 products, never TF32 tensor-core ones


@pytest.mark.parametrize(
    "target, capability", [("sm_90a", 90), ("sm_90", 90), ("90", 90), (90, 90), ("H100", 90), ("a100", 80)]
)
def test_parse_target(target, capability):
    assert aot.parse_target(target) == capability


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="Unknown target"):
        aot.parse_target("tpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        aot.compile_varlen_attention("int8", -1)
    with pytest.raises(ValueError, match="window must be"):
        aot.compile_varlen_attention("bf16", -5)


def test_compile_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError, match="pip install triton"):
        aot.compile_varlen_attention.__wrapped__("bf16", 64)


# --- the adapter against a stand-in tensorrt.plugin: signatures, mapping, idempotence -----------------


class _FakeTensorDesc:
    def __init__(self, shape, dtype):
        self.shape_expr = tuple(shape)  # ints stand in for shape expressions
        self.shape = tuple(shape)
        self.dtype = dtype

    def like(self):
        return _FakeTensorDesc(self.shape, self.dtype)


class _FakeLaunchParams:
    grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
    shared_mem = 0


class _FakeSymInt32:
    def __init__(self, value):
        self.value = value


class _FakeSymIntExprs(tuple):
    @classmethod
    def from_tuple(cls, values):
        return cls(values)


def _fake_tensorrt():
    """The parts of tensorrt / tensorrt.plugin that register() touches, recording each decoration."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "0.0-fake"
    trt.bfloat16, trt.float16, trt.float32, trt.int32 = "BF16", "FP16", "FP32", "INT32"
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.recorded = {}
    trtp.op = types.SimpleNamespace()

    def decorator(kind):
        def factory(plugin_id):
            def record(fn):
                assert kind not in trtp.recorded, f"{kind} decorated twice"
                trtp.recorded[kind] = (plugin_id, fn)
                if kind == "register":
                    namespace, name = plugin_id.split("::")
                    setattr(trtp.op, namespace, types.SimpleNamespace(**{name: fn}))
                return fn
            return record
        return factory

    trtp.register, trtp.autotune, trtp.aot_impl = decorator("register"), decorator("autotune"), decorator("aot_impl")
    trtp.TensorDesc = _FakeTensorDesc
    trtp.KernelLaunchParams = _FakeLaunchParams
    trtp.SymInt32 = _FakeSymInt32
    trtp.SymIntExprs = _FakeSymIntExprs
    trtp.AutoTuneCombination = lambda types_, layouts, tactics: (types_, layouts, tuple(tactics))
    trtp.cdiv = lambda a, b: -(-a // b)
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def fake_tensorrt(monkeypatch):
    trt, trtp = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setitem(trt_plugin._state, "registered", False)
    monkeypatch.setitem(trt_plugin._state, "target", None)
    return trtp


def test_adapter_signatures_follow_the_qdp_schema(fake_tensorrt):
    assert trt_plugin.register("sm_90a") == spec.PLUGIN_ID
    recorded = fake_tensorrt.recorded
    assert {plugin_id for plugin_id, _ in recorded.values()} == {spec.PLUGIN_ID}
    names = lambda fn: list(inspect.signature(fn).parameters)  # noqa: E731
    inputs, attributes = list(spec.INPUTS), list(spec.ATTRIBUTES)
    assert names(recorded["register"][1]) == inputs + attributes
    assert names(recorded["autotune"][1]) == inputs + ["outputs"]
    assert names(recorded["aot_impl"][1]) == inputs + attributes + ["outputs", "tactic"]
    # tensorrt.plugin checks annotations with issubclass: they must be classes, never strings.
    for _, fn in recorded.values():
        for param in inspect.signature(fn).parameters.values():
            assert not isinstance(param.annotation, str), f"{fn.__name__}.{param.name} has a string annotation"
    returned = typing.get_args(inspect.signature(recorded["aot_impl"][1]).return_annotation)
    assert returned[2] is _FakeLaunchParams and returned[3] is _FakeSymIntExprs


@requires_triton
def test_adapter_maps_the_launch_formulas(fake_tensorrt, monkeypatch):
    monkeypatch.setenv("ETTIN_PLUGIN_TACTICS", "all")
    trt_plugin.register("sm_90a")
    autotune = fake_tensorrt.recorded["autotune"][1]
    aot_impl = fake_tensorrt.recorded["aot_impl"][1]
    q = _FakeTensorDesc((1000, 12, 64), "BF16")
    cu_seqlens = _FakeTensorDesc((5,), "INT32")
    [(io_types, layouts, tactics)] = autotune(q, q, q, cu_seqlens, (q.like(),))
    assert io_types.replace(" ", "") == "BF16|FP16,BF16|FP16,BF16|FP16,INT32,BF16|FP16" and layouts == "LINEAR"
    assert tuple(tactics) == tuple(aot.TACTICS)
    monkeypatch.delenv("ETTIN_PLUGIN_TACTICS")
    [(_, _, default_tactics)] = autotune(q, q, q, cu_seqlens, (q.like(),))
    assert list(default_tactics) == [min(aot.TACTICS)]  # one tactic unless asked: older TensorRT rejects several
    monkeypatch.setenv("ETTIN_PLUGIN_TACTICS", "1,9")
    with pytest.raises(ValueError, match=r"unknown tactics \[9\]"):
        autotune(q, q, q, cu_seqlens, (q.like(),))
    for tactic in (0, *aot.TACTICS):
        name, ptx, launch, extra = aot_impl(q, q, q, cu_seqlens, 64, (q.like(),), tactic)
        config = aot.TACTICS.get(tactic, aot.TACTICS[1])
        kernel = aot.compile_varlen_attention("bf16", 64, 90, config, 64)
        assert (name, ptx) == (kernel.name, kernel.ptx)
        assert (launch.grid_x, launch.grid_y, launch.grid_z) == (-(-1000 // config.block_m) + 4, 12, 1)
        assert (launch.block_x, launch.block_y, launch.block_z) == (config.num_warps * 32, 1, 1)
        assert launch.shared_mem == kernel.launch.shared_mem
        assert [arg.value for arg in extra] == [4] and all(isinstance(a, _FakeSymInt32) for a in extra)


def test_register_is_idempotent(fake_tensorrt):
    trt_plugin.register("sm_90a")
    trt_plugin.register("sm_90a")  # a second decoration would raise in the stand-in, as in TensorRT
    trt_plugin._state["registered"] = False  # another importer registered it: found through trtp.op
    trt_plugin.register()
    assert len(fake_tensorrt.recorded) == 3


def test_register_with_real_tensorrt():
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"TensorRT is not installed: {exc} (it comes from NVIDIA's index, not PyPI)")
    assert trt_plugin.register() == spec.PLUGIN_ID
    assert trt_plugin.register() == spec.PLUGIN_ID
    import tensorrt.plugin as trtp

    assert hasattr(getattr(trtp.op, spec.PLUGIN_NAMESPACE), spec.OP_NAME)


@requires_triton
@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """The prepared GPU script must at least parse its arguments, compile, and write its JSON here."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_kernel_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_kernel_check.json").read_text())
    steps = result["steps"]
    assert steps["aot_compile"]["ok"] and steps["interpreter_smoke_fp32"]["ok"], steps
    assert all(e["entry_declared"] == ["u64", "u64", "u64", "u64", "u32", "u64"] for e in steps["aot_compile"]["kernels"])
    assert max(steps["interpreter_smoke_fp32"][f"max_error_window_{w}"] for w in (64, -1)) <= 1e-5
    assert steps["speed"]["skipped"] and list(tmp_path.glob("*.ptx"))
