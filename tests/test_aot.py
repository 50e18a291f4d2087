"""The AOT compile step (PTX for sm_90a on a CPU) and the tensorrt.plugin adapter's contract."""

import dataclasses
import inspect
import random
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
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
        # Hopper tensor-core MMAs on bf16 operands, not a scalar fallback or another type
        assert re.search(r"wgmma\.mma_async\S*\.bf16\.bf16", kernel.ptx)
    fp16 = aot.compile_varlen_attention("fp16", 64, "sm_90a")
    assert re.search(r"wgmma\.mma_async\S*\.f16\.f16", fp16.ptx) and ".bf16" not in fp16.ptx


# What TensorRT passes to an AOT kernel: the inputs, the int32 extra scalars, the outputs (QDP
# _plugin_class.py get_launch_params; the sample's kernels in samples/python/quickly_deployable_plugins).
TENSORRT_ARGUMENTS = ["u64", "u64", "u64", "u64", "u32", "u64"]  # q, k, v, cu_seqlens, num_pairs, out


def _variants():
    """Every variant the plugin can be asked for at D = 64: both types, global, Ettin's local window
    and a fresh one, every tactic (fp16 at the default tiles only, as the GPU check runs it)."""
    window = random.SystemRandom().randint(1, 300)
    variants = [("bf16", w, t) for w in (-1, 64, window) for t in sorted(aot.TACTICS)]
    return variants + [("fp16", w, min(aot.TACTICS)) for w in (-1, 64)]


@requires_triton
def test_every_variant_declares_exactly_what_tensorrt_passes_under_its_own_name():
    names = {}
    for dtype, window, tactic in _variants():
        kernel = aot.compile_varlen_attention(dtype, window, "sm_90a", aot.TACTICS[tactic])
        name, entry = aot.parse_entry(kernel.ptx)
        where = f"{dtype}/window {window}/tactic {tactic}"
        assert [t for t, _ in entry] == TENSORRT_ARGUMENTS, where
        assert [n for _, n in entry] == [f"{name}_param_{i}" for i in range(len(TENSORRT_ARGUMENTS))], where
        assert name == kernel.name == aot.entry_name(dtype, window, 64, aot.TACTICS[tactic]), where
        # Triton's own entry name is gone everywhere, and its hidden pointers are gone from the entry.
        assert not re.search(rf"\b{kernel.triton_name}\b", kernel.ptx), where
        assert kernel.hidden and set(kernel.hidden) == {"u64"}, where
        assert aot.verify_entry(kernel).declared == tuple(TENSORRT_ARGUMENTS)
        assert names.setdefault(name, where) == where, f"{where} and {names[name]} share the entry name {name}"
    assert len(names) == len(_variants())


def _cuda_tool(name):
    from triton.backends.nvidia import compiler

    path = Path(compiler.get_ptxas(90).path).with_name(name)
    return path if path.is_file() else None


@requires_triton
def test_the_rewritten_ptx_assembles_to_a_kernel_taking_exactly_those_parameters(tmp_path):
    """Assembled by the ptxas and read back by the cuobjdump that come with Triton: the kernel's
    parameter table (EIATTR_KPARAM_INFO) is the six arguments TensorRT passes, at ISA 8.0 too."""
    from triton.backends.nvidia import compiler

    cuobjdump = _cuda_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("this triton ships no cuobjdump beside its ptxas")
    for ptx_version in (None, 80):
        kernel = aot.compile_varlen_attention("bf16", 64, "sm_90a", ptx_version=ptx_version)
        source, cubin = tmp_path / f"{kernel.name}.ptx", tmp_path / f"{kernel.name}.cubin"
        source.write_text(kernel.ptx)
        subprocess.run([compiler.get_ptxas(90).path, "-arch=sm_90a", str(source), "-o", str(cubin)], check=True,
                       capture_output=True, timeout=120)
        elf = subprocess.run([str(cuobjdump), "-elf", str(cubin)], capture_output=True, text=True, check=True).stdout
        info = re.search(rf"^\.nv\.info\.{kernel.name}\n(.*?)(?=^\.\S|\Z)", elf, flags=re.MULTILINE | re.DOTALL)
        params = sorted((int(o, 16), int(size, 16)) for o, size in re.findall(
            r"Ordinal\s*:\s*(0x[0-9a-f]+)\s+Offset\s*:\s*0x[0-9a-f]+\s+Size\s*:\s*(0x[0-9a-f]+)", info.group(1)))
        assert params == [(i, 4 if t == "u32" else 8) for i, t in enumerate(TENSORRT_ARGUMENTS)], ptx_version
        symbols = subprocess.run([str(cuobjdump), "-symbols", str(cubin)], capture_output=True, text=True).stdout
        assert re.search(rf"STO_ENTRY\s+{kernel.name}$", symbols, flags=re.MULTILINE)


def _with_hidden_parameter(kernel, read: bool) -> str:
    """kernel's PTX with one more trailing pointer parameter on the entry (read in the body if asked)."""
    entry = aot._single_entry(kernel.ptx)
    extra = f"{kernel.name}_param_{len(kernel.params)}"
    params = entry.group(2).rstrip() + f",\n\t.param .u64 .ptr .global .align 1 {extra}\n"
    ptx = kernel.ptx[: entry.start(2)] + params + kernel.ptx[entry.end(2):]
    if read:
        body = ptx.index("{", ptx.index(".entry"))
        ptx = ptx[: body + 1] + f"\n\tld.param.b64 %rd999, [{extra}];" + ptx[body + 1:]
    return ptx


def test_hidden_parameters_are_stripped_only_when_the_body_never_reads_them(local_bf16):
    unread = _with_hidden_parameter(local_bf16, read=False)
    assert len(aot.parse_entry(unread)[1]) == len(local_bf16.params) + 1
    stripped, removed = aot.strip_hidden_parameters(unread, len(local_bf16.params))
    assert stripped == local_bf16.ptx and removed == ("u64",)  # exactly the parameter added, nothing else
    with pytest.raises(aot.AotContractError, match="reads hidden parameter"):
        aot.strip_hidden_parameters(_with_hidden_parameter(local_bf16, read=True), len(local_bf16.params))
    with pytest.raises(aot.AotContractError, match="declares 7 parameters; TensorRT passes exactly the 6"):
        aot.verify_entry(dataclasses.replace(local_bf16, ptx=unread))


def test_renaming_reaches_every_reference_and_round_trips(local_bf16):
    renamed = aot.rename_entry(local_bf16.ptx, "some_other_entry")
    name, entry = aot.parse_entry(renamed)
    assert name == "some_other_entry" and [n for _, n in entry] == [f"{name}_param_{i}" for i in range(6)]
    assert local_bf16.name not in renamed
    assert renamed.count("some_other_entry_param_") == local_bf16.ptx.count(f"{local_bf16.name}_param_")
    assert aot.rename_entry(renamed, local_bf16.name) == local_bf16.ptx
    with pytest.raises(aot.AotContractError, match="entry name"):
        aot.verify_entry(dataclasses.replace(local_bf16, ptx=renamed))


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


# --- the PTX ISA version and the Triton range ----------------------------------------------------------


@requires_triton
def test_ptx_version_is_lowered_as_asked_and_never_below_the_architecture():
    default = aot.compile_varlen_attention("bf16", -1, "sm_90a")
    assert aot.ptx_version_number(default.ptx_version) == aot.triton_default_ptx_version("sm_90a")
    for version in (80, 84):
        kernel = aot.compile_varlen_attention("bf16", -1, "sm_90a", ptx_version=version)
        assert kernel.ptx_version == aot.ptx_version_text(version) and kernel.name == default.name
        assert aot.parse_entry(kernel.ptx) == aot.parse_entry(default.ptx)  # same entry, older ISA
    # LLVM would abort the process on 7.8 for sm_90a; the compile refuses it first.
    with pytest.raises(ValueError, match=r"PTX ISA 7.8 is below what sm_90 accepts \(8.0\)"):
        aot.compile_varlen_attention("bf16", -1, "sm_90a", ptx_version=78)
    assert [aot.ptx_version_text(v) for v in (80, 87, 94)] == ["8.0", "8.7", "9.4"]
    assert all(aot.ptx_version_number(aot.ptx_version_text(v)) == v for v in range(70, 100))


@pytest.mark.parametrize(("version", "supported"), [
    ("3.2.0", False), ("3.3.0", True), ("3.5.1", True), ("3.9.0", True), ("3.9.1+git0a1b2c3", True),
    ("3.10.0", False), ("4.0.0", False), ("2.3.1", False), ("nightly", False),
])
def test_triton_range(version, supported):
    problem = aot.triton_version_problem(version)
    assert (problem is None) == supported
    if problem:
        assert f"OpenAI Triton {version} is outside" in problem and f"pip install '{aot.TRITON_REQUIREMENT}'" in problem


def test_pyproject_pins_the_range_the_compile_checks():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["kernel"] == [aot.TRITON_REQUIREMENT]


def test_an_unsupported_triton_is_refused_before_compiling(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.2.0"))
    with pytest.raises(aot.TritonVersionError, match=r"Triton 3.2.0 is outside .* pip install 'triton>=3.3,<3.10'"):
        aot.compile_varlen_attention.__wrapped__("bf16", 64)


def test_launch_formulas_come_from_shapes(local_bf16):
    launch = local_bf16.launch
    assert launch.block() == (local_bf16.config.num_warps * 32, 1, 1)
    total, pairs, heads = aot.shape_values((1000, 12, 64), (5,))
    assert (total, pairs, heads) == (1000, 4, 12)
    assert launch.grid(total, pairs, heads) == (-(-1000 // local_bf16.config.block_m) + 4, 12, 1)
    assert launch.scalar_args(total, pairs, heads) == (4,)
    assert 0 < launch.shared_mem <= aot.SHARED_MEM_LIMIT


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
    with pytest.raises(ImportError, match=r"pip install 'triton>=3.3,<3.10'"):
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
    monkeypatch.setitem(trt_plugin._state, "ptx_version", None)
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
        assert (name, ptx) == (kernel.name, kernel.ptx) and name == aot.entry_name("bf16", 64, 64, config)
        assert (launch.grid_x, launch.grid_y, launch.grid_z) == (-(-1000 // config.block_m) + 4, 12, 1)
        assert (launch.block_x, launch.block_y, launch.block_z) == (config.num_warps * 32, 1, 1)
        assert launch.shared_mem == kernel.launch.shared_mem
        assert [arg.value for arg in extra] == [4] and all(isinstance(a, _FakeSymInt32) for a in extra)


@requires_triton
def test_adapter_compiles_at_the_ptx_version_it_was_registered_with(fake_tensorrt):
    """The build registers with the ISA its preflight chose; every kernel aot_impl hands TensorRT has it."""
    trt_plugin.register("sm_90a", ptx_version=82)
    aot_impl = fake_tensorrt.recorded["aot_impl"][1]
    q, cu_seqlens = _FakeTensorDesc((300, 12, 64), "BF16"), _FakeTensorDesc((3,), "INT32")
    entries = set()
    for window in (-1, 64):
        name, ptx, _, _ = aot_impl(q, q, q, cu_seqlens, window, (q.like(),), 1)
        assert re.search(r"^\.version 8\.2$", ptx, flags=re.MULTILINE), window
        entries.add(name)
    assert len(entries) == 2  # a global and a local layer of one engine never share an entry name
    trt_plugin.register("sm_90a", ptx_version=80)  # a later build in the same process
    assert re.search(r"^\.version 8\.0$", aot_impl(q, q, q, cu_seqlens, -1, (q.like(),), 1)[1], flags=re.MULTILINE)


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


# --- attributes as TensorRT hands them to the plugin ---------------------------------------------------


def _tensorrt_attribute(annotation, data: np.ndarray):
    """How tensorrt.plugin's creator rebuilds one attribute (_TemplatePluginCreator.create_plugin, the
    same in TensorRT 10.9 ... 11.1 and HEAD): an `npt.NDArray[dtype]` annotation gets `data.astype(dtype)`,
    str gets the bytes decoded, any other annotation is called on the data. `data` is the field's buffer
    as the Python bindings expose it: always a 1-D array."""
    if typing.get_origin(annotation) is np.ndarray:
        return data.astype(typing.get_args(typing.get_args(annotation)[1])[0])
    if annotation is str:
        return data.tobytes().decode()
    return annotation(data)


def _fields_from_onnx_node(window: int) -> dict:
    """The plugin fields the ONNX parser builds from the node (onnx-tensorrt loadFields): an INT
    attribute becomes one kINT32 element."""
    return {"window": np.array([window], dtype=np.int32)}


@requires_triton
@pytest.mark.parametrize("window", [64, -1, 3])
def test_window_reaches_the_plugin_as_tensorrt_marshals_it(fake_tensorrt, window):
    """Fails with `int(1-D array)` (TypeError on NumPy >= 2.4) if the attribute is annotated `int`."""
    trt_plugin.register("sm_90a")
    register_fn = fake_tensorrt.recorded["register"][1]
    aot_impl = fake_tensorrt.recorded["aot_impl"][1]
    annotations = {name: p.annotation for name, p in inspect.signature(register_fn).parameters.items()}
    # tensorrt.plugin refuses an aot_impl whose attribute annotation differs from the registration's.
    assert inspect.signature(aot_impl).parameters["window"].annotation == annotations["window"]
    attrs = {name: _tensorrt_attribute(annotations[name], data) for name, data in _fields_from_onnx_node(window).items()}
    q, cu_seqlens = _FakeTensorDesc((300, 12, 64), "BF16"), _FakeTensorDesc((3,), "INT32")
    name, _, _, _ = aot_impl(q, q, q, cu_seqlens, attrs["window"], (q.like(),), 1)
    assert name == aot.entry_name("bf16", window, 64, aot.TACTICS[1])


@pytest.mark.parametrize("value, expected", [(64, 64), (np.array([64], np.int32), 64), (np.array(-1), -1),
                                             (np.array([3], np.int64), 3)])
def test_window_value_unwraps_one_integer(value, expected):
    assert trt_plugin.window_value(value) == expected and type(trt_plugin.window_value(value)) is int


@pytest.mark.parametrize("value", [np.array([64, 64], np.int32), np.array([], np.int32), np.array([1.5])])
def test_window_value_refuses_anything_but_one_integer(value):
    with pytest.raises(ValueError, match="window attribute must be one integer"):
        trt_plugin.window_value(value)
