"""The TensorRT runtime's logic without TensorRT: the artifact's facts against this machine, the profile
limits, batches within them, input order, threads, and EngineSession driven through stand-ins for TensorRT and
polygraphy's CUDA buffers. The stand-ins compute a known function of the tokens (the mean token id of
each pair), so every score can be checked. The real engine test at the end skips with the reason."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from ettin_export.synthetic.text import random_pairs
from ettin_export.engine.rules import engine_profile
from ettin_runtime import Artifact, ArtifactError, LoadOptions, Reranker
from ettin_runtime.artifact import Engine, Limits, ModelFacts, ParitySummary, Source, TensorRTFacts, hash_files
from ettin_runtime.backends import tensorrt as tb
from ettin_runtime.packing import PairEncoder, pack

HOPPER = tb.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "570.124.06", 12080)
ENGINE = TensorRTFacts(tensorrt_version="10.9.0.34", compute_capability="9.0", ptx_version="8.7", ptx_target="sm_90a",
                       gpu_name="NVIDIA H100 80GB HBM3")


def mean_token_id(input_ids: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """The stand-in engine's "score" of each pair."""
    return np.array([input_ids[a:b].mean() for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])], dtype=np.float32)


# --- the manifest against this machine ---------------------------------------------------------------


def test_same_machine_has_no_problems():
    assert tb.environment_problems(ENGINE, "10.9.0.34", HOPPER) == []
    tb.check_environment(ENGINE, "10.9.0.34", HOPPER)


def test_other_tensorrt_release_is_named_with_the_fix():
    (problem,) = tb.environment_problems(ENGINE, "10.13.3.9", HOPPER)
    assert "built with TensorRT 10.9.0.34, this process has TensorRT 10.13.3.9" in problem
    assert "pip install tensorrt-cu12==10.9.0.34 --extra-index-url https://pypi.nvidia.com" in problem


def test_other_gpu_is_named():
    a100 = tb.GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), "550.54.15", 12080)
    (problem,) = tb.environment_problems(ENGINE, "10.9.0.34", a100)
    assert "built for compute capability 9.0 (NVIDIA H100 80GB HBM3)" in problem
    assert "this GPU is NVIDIA A100-SXM4-80GB (compute capability 8.0)" in problem and "sm_90a" in problem


def test_driver_too_old_for_the_ptx():
    old = tb.GpuInfo(HOPPER.name, (9, 0), "550.54.15", 12040)
    (problem,) = tb.environment_problems(ENGINE, "10.9.0.34", old)
    assert "PTX is ISA 8.7, which needs a driver for CUDA 12.8 or newer" in problem
    assert "(550.54.15) supports CUDA 12.4" in problem
    assert tb.environment_problems(ENGINE, "10.9.0.34", old, check_driver=False) == []
    assert tb.driver_needed_for_ptx("8.7") == 12080 and tb.driver_needed_for_ptx("9.9") is None


def test_every_problem_is_reported_at_once():
    a100_old = tb.GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), None, 12000)
    with pytest.raises(tb.EnvironmentMismatch) as error:
        tb.check_environment(ENGINE, "10.8.0.43", a100_old, where="artifacts/x")
    message = str(error.value)
    assert message.startswith("artifacts/x cannot run here:") and message.count("\n  - ") == 3
    from ettin_runtime.errors import EttinError

    assert isinstance(error.value, EttinError)  # the CLI prints it without a traceback (exit 2)
    with pytest.raises(ArtifactError, match="must record tensorrt_version and compute_capability"):
        TensorRTFacts.from_json({"compute_capability": "9.0"})


# --- limits: batches never exceed the profile ------------------------------------------------------------


def test_limits_are_the_profiles_maxima():
    limits = engine_profile(16, 200)
    assert (limits.max_batch_pairs, limits.max_batch_tokens) == (16, 3200)
    assert Limits.from_json(limits.to_json()) == limits
    assert limits.to_json() == {"profile": {"total_tokens": [1, 16 * 128, 3200], "num_pairs_plus_1": [2, 17, 17]}}
    with pytest.raises(ArtifactError, match=r"limits.profile.total_tokens is \[1\]; expected \[min, opt, max\]"):
        Limits.from_json({"profile": {"total_tokens": [1], "num_pairs_plus_1": [2, 3, 3]}})


def test_a_batch_beyond_the_profile_never_reaches_the_engine(encoder):
    session = RecordingSession(tb_limits(4, 400))
    reranker = tb.TensorRTReranker(session, encoder, _artifact(engine_profile(4, 100, 400), max_length=100))
    too_big = pack([np.arange(120, dtype=np.int32)] * 4)  # 4 pairs, 480 tokens
    with pytest.raises(ArtifactError, match="a batch of 4 pairs / 480 tokens exceeds the engine's profile"):
        reranker._score(too_big)
    assert session.shapes == []


# --- the reranker over a stand-in session -------------------------------------------------------------------


def tb_limits(pairs: int, tokens: int) -> Limits:
    return Limits(max_batch_pairs=pairs, max_batch_tokens=tokens)


class RecordingSession:
    def __init__(self, limits: Limits):
        self.shapes = []
        self.limits = limits

    def run(self, input_ids, cu_seqlens):
        self.shapes.append((len(cu_seqlens) - 1, len(input_ids)))
        return mean_token_id(input_ids, cu_seqlens)


def _artifact(limits: Limits, max_length: int = 200, root: Path = Path("unused"), files=None) -> Artifact:
    return Artifact(
        root=root, source=Source(model="test"), model=ModelFacts(64, 4, 2, 32, 96, (-1, 16, 16, -1), "cls", 50368),
        score_activation="identity", max_length=max_length, target="h100", precision="bf16",
        engine=Engine(format="tensorrt", file="model.plan", runtime="tensorrt", tensorrt=ENGINE), limits=limits,
        files=files or {}, parity=ParitySummary(passed=True),  # a stand-in engine: its gate is not the point here
    )


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return PairEncoder.from_dir(tiny_checkpoint, 200)


def test_scores_come_back_float32_in_input_order_within_the_profile(encoder):
    session = RecordingSession(tb_limits(8, 1600))
    reranker = tb.TensorRTReranker(session, encoder, _artifact(engine_profile(8, 200)))
    assert (reranker.max_batch_pairs, reranker.max_batch_tokens) == (8, 1600)
    pairs = random_pairs(61, seed=4, document_words=(0, 400))
    expected = np.array([ids.mean() for ids in encoder.encode(pairs)], dtype=np.float32)
    for batch_size in (None, 1, 1000):  # a caller's batch_size cannot push past the profile
        session.shapes.clear()
        scores = reranker.predict(pairs, batch_size=batch_size)
        assert scores.dtype == np.float32 and np.array_equal(scores, expected)
        assert all(p <= 8 and t <= 1600 for p, t in session.shapes)
    assert reranker.rank(pairs[0][0], [d for _, d in pairs[:5]], top_k=2)[0]["score"] == expected[:5].max()


def test_limits_outside_the_profile_are_refused(encoder):
    artifact = _artifact(engine_profile(8, 200))
    with pytest.raises(ArtifactError, match=r"max_batch_pairs=9 is outside the engine's profile \(1..8\)"):
        tb.TensorRTReranker(RecordingSession(tb_limits(8, 1600)), encoder, artifact, max_batch_pairs=9)
    with pytest.raises(ArtifactError, match="max_length 200 exceeds the engine's profile of 150 tokens"):
        tb.TensorRTReranker(RecordingSession(tb_limits(8, 150)), encoder, artifact)


# --- EngineSession through stand-ins for TensorRT and polygraphy's CUDA ----------------------------------------


class FakeDeviceArray:
    registry: dict[int, FakeDeviceArray] = {}

    def __init__(self, shape, dtype):
        self.data = np.zeros(shape, dtype=np.dtype(dtype))
        self.ptr = 0x1000 + len(FakeDeviceArray.registry) * 0x100
        FakeDeviceArray.registry[self.ptr] = self

    def copy_from(self, host, stream=None):
        assert host.dtype == self.data.dtype and host.nbytes <= self.data.nbytes
        self.data.reshape(-1)[: host.size] = host.reshape(-1)
        return self

    def view(self, shape):
        return types.SimpleNamespace(copy_to=lambda host, stream=None: host.__setitem__(
            Ellipsis, self.data.reshape(-1)[: int(np.prod(shape))].reshape(shape)))

    def free(self):
        pass


def fake_cuda():
    cuda = types.SimpleNamespace(
        DeviceArray=FakeDeviceArray,
        Stream=lambda: types.SimpleNamespace(ptr=7, synchronize=lambda: None, free=lambda: None),
    )
    return cuda, types.SimpleNamespace(INT32="int32", FLOAT32="float32")


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.busy = engine, {}, {}, False

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        self.shapes[name] = shape
        return low[0] <= shape[0] <= high[0]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        assert not self.busy, "two callers inside one execution context"
        self.busy = True
        time.sleep(0.002)  # widen the window a missing lock would leave open
        buffers = {n: FakeDeviceArray.registry[p].data for n, p in self.addresses.items()}
        tokens, pairs = self.shapes["input_ids"][0], self.shapes["cu_seqlens"][0] - 1
        ids, cu = buffers["input_ids"][:tokens], buffers["cu_seqlens"][: pairs + 1]
        buffers["scores"].reshape(-1)[:pairs] = mean_token_id(ids, cu)
        self.busy = False
        return True


def fake_tensorrt(version="10.9.0.34", max_pairs=8, max_tokens=1600, scores_dtype="float32"):
    trt = types.SimpleNamespace(__version__=version, int32="int32", float32="float32", deserialized=[])
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.Logger = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    class ILogger:
        def __init__(self):
            pass

    trt.ILogger = ILogger
    io = {"input_ids": ("input", "int32"), "cu_seqlens": ("input", "int32"), "scores": ("output", scores_dtype)}
    profile = {"input_ids": [(1,), (256,), (max_tokens,)], "cu_seqlens": [(2,), (max_pairs + 1,), (max_pairs + 1,)]}
    engine = types.SimpleNamespace(
        num_io_tensors=3, get_tensor_name=lambda i: list(io)[i], get_tensor_mode=lambda n: io[n][0],
        get_tensor_dtype=lambda n: io[n][1], get_tensor_profile_shape=lambda n, p: profile[n],
    )
    engine.create_execution_context = lambda: FakeContext(engine)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            trt.deserialized.append(plan)
            if plan != b"plan":
                self.logger.log(trt.Logger.ERROR, "Serialization assertion failed: magic tag mismatch")
                return None
            return engine

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def artifact(tmp_path, tiny_checkpoint, monkeypatch):
    """An artifact folder whose engine is the stand-in, and the stand-ins installed."""
    root = tmp_path / "artifact"
    root.mkdir()
    (root / "model.plan").write_bytes(b"plan")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_checkpoint) / name).is_file():
            (root / name).write_bytes((Path(tiny_checkpoint) / name).read_bytes())
    _artifact(engine_profile(8, 200), root=root, files=hash_files(root, [p.name for p in root.iterdir()])).write()
    (root / "parity.json").write_text('{"passed": true}\n')  # the report the manifest's summary must agree with
    state = {"trt": fake_tensorrt(), "gpu": HOPPER}
    monkeypatch.setattr(tb, "import_tensorrt", lambda: state["trt"])
    monkeypatch.setattr(tb, "probe_gpu", lambda device=0: state["gpu"])
    monkeypatch.setattr(tb, "_import_polygraphy_cuda", fake_cuda)
    return root, state


def test_load_and_predict_through_the_engine_session(artifact, encoder):
    root, _ = artifact
    reranker = Reranker.load(root)  # the runtime the manifest's engine names
    assert isinstance(reranker, tb.TensorRTReranker)
    assert (reranker.max_batch_pairs, reranker.max_batch_tokens) == (8, 1600)
    pairs = random_pairs(37, seed=9, document_words=(0, 300))
    expected = np.array([ids.mean() for ids in encoder.encode(pairs)], dtype=np.float32)
    assert np.array_equal(reranker.predict(pairs), expected)
    assert np.array_equal(reranker.predict(pairs, batch_size=100), expected)


def test_concurrent_callers_share_one_session_safely(artifact, encoder):
    root, _ = artifact
    reranker = Reranker.load(root)
    work = [random_pairs(23, seed=s, document_words=(0, 250)) for s in range(8)]
    expected = [np.array([ids.mean() for ids in encoder.encode(p)], dtype=np.float32) for p in work]
    results, errors = [None] * 8, []

    def call(index):
        try:
            for _ in range(3):
                results[index] = reranker.predict(work[index])
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_mismatches_stop_before_deserializing(artifact):
    root, state = artifact
    state["trt"] = fake_tensorrt(version="10.13.3.9")
    mismatch = "built with TensorRT 10.9.0.34, this process has TensorRT 10.13.3.9"
    with pytest.raises(tb.EnvironmentMismatch, match=mismatch):
        Reranker.load(root)
    assert state["trt"].deserialized == []
    state["trt"] = fake_tensorrt()
    state["gpu"] = tb.GpuInfo("NVIDIA L4", (8, 9), "550.54.15", 12080)
    with pytest.raises(tb.EnvironmentMismatch, match=r"this GPU is NVIDIA L4 \(compute capability 8.9\)"):
        Reranker.load(root)
    assert state["trt"].deserialized == []


def test_engine_problems_are_clear_errors(artifact):
    root, state = artifact
    (root / "model.plan").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="damaged"):  # the sha256 in the manifest catches it first
        Reranker.load(root)
    unverified = Artifact.read(root)  # the manifest alone, no hashing: the engine itself must refuse it
    with pytest.raises(ArtifactError, match="could not deserialize .*magic tag mismatch"):
        unverified.load()
    (root / "model.plan").write_bytes(b"plan")
    state["trt"] = fake_tensorrt(max_pairs=4)
    with pytest.raises(ArtifactError, match="manifest.json says the profile holds 8 pairs and 1600 tokens, the engine 4"):
        unverified.load()
    state["trt"] = fake_tensorrt(scores_dtype="float16")
    with pytest.raises(ArtifactError, match="not an ettin-export reranker engine: scores is output float16"):
        unverified.load()


def test_an_onnx_artifact_is_not_taken_for_an_engine(artifact):
    root, _ = artifact
    loaded = Artifact.open(root)
    onnx_one = loaded.replace(engine=dataclasses.replace(loaded.engine, format="onnx"))
    with pytest.raises(ArtifactError, match="holds a onnx graph, not a TensorRT engine"):
        tb.TensorRTReranker.from_artifact(onnx_one, LoadOptions())


# --- without TensorRT, and without torch -----------------------------------------------------------------------


def test_missing_tensorrt_says_how_to_install_it():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except (ImportError, OSError):
        pass
    from ettin_runtime.errors import MissingDependency

    with pytest.raises(MissingDependency, match=r"pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com"):
        tb.import_tensorrt()


def test_the_backend_never_imports_torch():
    code = ("import sys, numpy as np; from ettin_runtime.backends import tensorrt as tb; "
            "from ettin_runtime.artifact import TensorRTFacts; "
            "tb.environment_problems(TensorRTFacts('10.9.0.34', '9.0'), '10.9.0.34', tb.GpuInfo('x', (9, 0), None, None)); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


class _FakeLibcuda:
    """libcuda.so.1 as probe_gpu calls it through ctypes: each entry point writes through its byref
    arguments and returns a CUresult."""

    def __init__(self, *, init=0, devices=1, name=b"NVIDIA H100 80GB HBM3", capability=(9, 0), version=12040):
        self.init, self.devices, self.name, self.capability, self.version = init, devices, name, capability, version

    def cuInit(self, flags):
        return self.init

    def cuGetErrorString(self, rc, text):
        text._obj.value = {100: b"no CUDA-capable device is detected", 999: b"unknown error"}.get(rc, b"?")
        return 0

    def cuDeviceGetCount(self, count):
        count._obj.value = self.devices
        return 0

    def cuDeviceGet(self, handle, ordinal):
        handle._obj.value = ordinal
        return 0

    def cuDeviceGetName(self, buffer, size, handle):
        buffer.value = self.name[: size - 1]
        return 0

    def cuDeviceGetAttribute(self, value, attribute, handle):
        value._obj.value = {75: self.capability[0], 76: self.capability[1]}[attribute]
        return 0

    def cuDriverGetVersion(self, version):
        version._obj.value = self.version
        return 0


def _with_libcuda(monkeypatch, lib):
    real = tb.ctypes.CDLL

    def load(name, *args, **kwargs):
        if name != "libcuda.so.1":
            return real(name, *args, **kwargs)
        if isinstance(lib, Exception):
            raise lib
        return lib

    monkeypatch.setattr(tb.ctypes, "CDLL", load)


def test_probe_reads_name_capability_and_driver_version_from_libcuda(monkeypatch):
    cuda = random.SystemRandom().choice([12020, 12040, 12060, 12080, 13000])
    _with_libcuda(monkeypatch, _FakeLibcuda(name=b"NVIDIA H200", capability=(9, 0), version=cuda))
    gpu = tb.probe_gpu(0)
    assert (gpu.name, gpu.compute_capability, gpu.capability) == ("NVIDIA H200", (9, 0), "9.0")
    assert gpu.cuda_driver_version == cuda and gpu.cuda_version == f"{cuda // 1000}.{cuda % 1000 // 10}"


@pytest.mark.parametrize(("lib", "message"), [
    (OSError("libcuda.so.1: cannot open shared object file"), "no NVIDIA driver here (libcuda.so.1 cannot be loaded)"),
    (_FakeLibcuda(init=100), "refused to initialise CUDA: CUDA error 100 (no CUDA-capable device is detected)"),
    (_FakeLibcuda(devices=0), "CUDA device 0 asked for, but the driver sees 0 device(s)"),
])
def test_probe_without_a_usable_driver_is_a_clear_error(monkeypatch, lib, message):
    _with_libcuda(monkeypatch, lib)
    with pytest.raises(tb.GpuUnavailable) as error:
        tb.probe_gpu(0)
    assert message in str(error.value)


def test_loading_on_a_leaking_tensorrt_release_warns(artifact):
    root, state = artifact
    loaded = Artifact.open(root)
    for version, leaks in (("11.1.0.106", True), ("11.2.1.2", True), ("10.9.0.34", False)):
        facts = dataclasses.replace(loaded.engine.tensorrt, tensorrt_version=version)
        built = loaded.replace(engine=dataclasses.replace(loaded.engine, tensorrt=facts))
        state["trt"] = fake_tensorrt(version=version)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            built.load()
        leak = [w for w in caught if "NVIDIA/TensorRT#4849" in str(w.message)]
        assert bool(leak) == leaks, version
        assert not leaks or issubclass(leak[0].category, RuntimeWarning)


# --- needs TensorRT and the GPU ---------------------------------------------------------------------------------


def test_real_engine_matches_the_bf16_pytorch_model(tmp_path, tiny_checkpoint):
    from ettin_export.targets import get_target
    from ettin_export.engine.tensorrt import TensorRTUnavailable, preflight

    try:
        preflight(get_target("h100"))
    except TensorRTUnavailable as error:
        pytest.skip(f"needs TensorRT and an H100/H200: {str(error).splitlines()[0]}")
    import torch

    from ettin_export.pipeline import BuildOptions, run_build
    from ettin_export.checkpoint import load_checkpoint
    from ettin_export.model.torch_reranker import TorchReranker

    out = tmp_path / "tiny-h100"
    options = BuildOptions(out=out, target=get_target("h100"), max_length=200, max_batch_pairs=16,
                           parity_queries=2, check_crossencoder=False, quiet=True)
    assert run_build(lambda: load_checkpoint(str(tiny_checkpoint), max_length=200), options) == 0
    pairs = random_pairs(40, seed=2, document_words=(0, 300))
    engine = tb.TensorRTReranker.load(out).predict(pairs)
    reference = TorchReranker.from_checkpoint(str(tiny_checkpoint), dtype=torch.bfloat16, device="cuda").predict(pairs)
    assert np.max(np.abs(engine - reference)) < 0.5
