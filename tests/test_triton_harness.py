"""A real Triton server (python backend) on the CPU: scripts/triton_server.py starts it, two tiny models
answer exact values over HTTP (binary and JSON) and gRPC, and stopping leaves no process or shm behind.

`echo_sum` checks tensor transport (INT64, FP32, BYTES with arbitrary UTF-8), the way the stub's numpy
corrupts data when it is numpy 2. `ort_tok` proves `tokenizers` and `onnxruntime` work inside the stub:
it tokenizes (query, document) pairs and runs an ONNX Add graph.

Skips with the reason when the server env cannot be built (no PyPI, no shared libpython); set
ETTIN_REQUIRE_TRITON=1 (CI) to turn that skip into a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ettin_export.serving import processes

from .tritonserver import SCRIPT, harness, server_env_or_skip, triton_env

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT_S = 60
WORDS = ["the", "query", "document", "ranks", "first", "second", "relevant", "passage", "about", "cats",
         "dogs", "triton", "server", "tokens", "packed", "model"]
ODD_TEXTS = ["", "a, b; \"quoted\" \\ back", "line\nbreak\ttab", "naïve café ünïcödé", "日本語のテキスト",
             "emoji 🐈‍⬛ 👍🏽", "x" * 700]




# --------------------------------------------------------------------------------------------------
# The model repository
# --------------------------------------------------------------------------------------------------

def python_model_config(inputs: str, outputs: str) -> str:
    """A python-backend config.pbtxt: no batching, one CPU instance. Tensors are "NAME:TYPE:DIMS" words,
    e.g. "X:FP32:-1 IDS:INT64:-1,-1"."""
    def tensors(words: str) -> str:
        return ",\n".join(f'  {{ name: "{name}" data_type: TYPE_{kind} dims: [ {dims.replace(",", ", ")} ] }}'
                           for name, kind, dims in (word.split(":") for word in words.split()))

    return (f'backend: "python"\nmax_batch_size: 0\ninput [\n{tensors(inputs)}\n]\noutput [\n{tensors(outputs)}\n]\n'
            "instance_group [ { kind: KIND_CPU count: 1 } ]\n")


ECHO_SUM_CONFIG = python_model_config(
    "INT_IN:INT64:-1 FLOAT_IN:FP32:-1 TEXT_IN:STRING:-1",
    "INT_SUM:INT64:1 INT_ECHO:INT64:-1 FLOAT_TWICE:FP32:-1 TEXT_ECHO:STRING:-1 TEXT_UPPER:STRING:-1 TEXT_BYTES:INT64:-1")

ECHO_SUM_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            ints = pb_utils.get_input_tensor_by_name(request, "INT_IN").as_numpy()
            floats = pb_utils.get_input_tensor_by_name(request, "FLOAT_IN").as_numpy()
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT_IN").as_numpy()  # object array of bytes
            decoded = [t.decode("utf-8") for t in texts.reshape(-1)]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("INT_SUM", np.array([ints.sum()], dtype=np.int64)),
                pb_utils.Tensor("INT_ECHO", ints.astype(np.int64)),
                pb_utils.Tensor("FLOAT_TWICE", (floats * np.float32(2)).astype(np.float32)),
                pb_utils.Tensor("TEXT_ECHO", texts),
                pb_utils.Tensor("TEXT_UPPER", np.array([t.upper().encode("utf-8") for t in decoded], dtype=np.object_)),
                pb_utils.Tensor("TEXT_BYTES", np.array([len(t) for t in texts.reshape(-1)], dtype=np.int64)),
            ]))
        return responses
'''

ORT_TOK_CONFIG = python_model_config(
    "X:FP32:-1 Y:FP32:-1 QUERY:STRING:1 DOCUMENTS:STRING:-1",
    "Z:FP32:-1 INPUT_IDS:INT64:-1,-1 ATTENTION_MASK:INT64:-1,-1 VERSIONS:STRING:3")

ORT_TOK_MODEL = '''
import json
from pathlib import Path

import numpy as np
import onnxruntime
import tokenizers
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        here = Path(__file__).parent
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(here / "add.onnx"), options, providers=["CPUExecutionProvider"])
        self.tokenizer = tokenizers.Tokenizer.from_file(str(here / "tokenizer.json"))
        self.versions = np.array([m.__version__.encode() for m in (np, onnxruntime, tokenizers)], dtype=np.object_)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            y = pb_utils.get_input_tensor_by_name(request, "Y").as_numpy()
            query = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy().reshape(-1)[0].decode("utf-8")
            documents = pb_utils.get_input_tensor_by_name(request, "DOCUMENTS").as_numpy().reshape(-1)
            documents = [d.decode("utf-8") for d in documents]
            (z,) = self.session.run(None, {"x": x, "y": y})
            encodings = self.tokenizer.encode_batch([(query, d) for d in documents])
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("Z", z),
                pb_utils.Tensor("INPUT_IDS", np.array([e.ids for e in encodings], dtype=np.int64)),
                pb_utils.Tensor("ATTENTION_MASK", np.array([e.attention_mask for e in encodings], dtype=np.int64)),
                pb_utils.Tensor("VERSIONS", self.versions),
            ]))
        return responses
'''


def write_add_onnx(path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="the test builds its ONNX graph with onnx: pip install onnx")
    from onnx import TensorProto, helper

    vector = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in ("x", "y", "z")]
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "add", vector[:2], vector[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the stub env may hold
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_tokenizer():
    tokenizers = pytest.importorskip("tokenizers", reason="pip install tokenizers")
    from tokenizers import models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]")
    return tokenizer


def write_repository(root: Path) -> Path:
    models = {"echo_sum": (ECHO_SUM_CONFIG, ECHO_SUM_MODEL), "ort_tok": (ORT_TOK_CONFIG, ORT_TOK_MODEL)}
    for name, (config, code) in models.items():
        version = root / name / "1"
        version.mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(textwrap.dedent(config).lstrip())
        (version / "model.py").write_text(textwrap.dedent(code).lstrip())
    write_add_onnx(root / "ort_tok" / "1" / "add.onnx")
    build_tokenizer().save(str(root / "ort_tok" / "1" / "tokenizer.json"))
    return root


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_env():
    return server_env_or_skip()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return write_repository(tmp_path_factory.mktemp("triton-repo"))


@pytest.fixture(scope="module")
def server(server_env, repository, tmp_path_factory):
    logs = tmp_path_factory.mktemp("triton-logs")
    handle = harness.start_server(repository, server_env, log_path=logs / "server.log", die_with_parent=True)
    try:
        yield handle
    finally:
        report = handle.stop()
        assert report["exited"], f"the server did not exit: {report}\n{handle.log_tail()}"
        assert not _processes_mentioning(handle.shm_prefix), "python-backend stubs survived the server"
        assert not list(Path("/dev/shm").glob(handle.shm_prefix + "*")), report


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes containing `text` (stubs carry their shm region name)."""
    found = []
    for pid in processes.all_pids():
        arguments, state = processes.command_line(pid), processes.process_state(pid)
        if pid != os.getpid() and arguments is not None and state not in (None, "Z"):
            cmdline = " ".join(arguments)
            if text in cmdline:
                found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")  # shown by pytest on failure
    return np.random.default_rng(seed)


def random_texts(rng, n: int) -> list[str]:
    texts = [" ".join(rng.choice(WORDS + ["unknown", "Cats", "DOGS!"], size=rng.integers(1, 12))) for _ in range(n)]
    return texts + ODD_TEXTS


# --------------------------------------------------------------------------------------------------
# Clients: one call per protocol, returning {output name: numpy array}
# --------------------------------------------------------------------------------------------------

PROTOCOLS = ["http-binary", "http-json", "grpc"]


def infer(server, protocol: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """Strings travel as numpy object arrays of UTF-8 `bytes` with Triton datatype BYTES (TYPE_STRING)."""
    from tritonclient.utils import np_to_triton_dtype

    if protocol == "grpc":
        import tritonclient.grpc as client_module

        client = client_module.InferenceServerClient(server.grpc_url, channel_args=harness.GRPC_LOOPBACK_CHANNEL_ARGS)
        kwargs = {"client_timeout": CLIENT_TIMEOUT_S}
    else:
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(server.http_address, network_timeout=CLIENT_TIMEOUT_S)
        kwargs = {}
    binary = {"binary_data": protocol == "http-binary"} if protocol.startswith("http") else {}
    try:
        infer_inputs = []
        for name, array in inputs.items():
            tensor = client_module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array, **binary)
            infer_inputs.append(tensor)
        requested = [client_module.InferRequestedOutput(name, **binary) for name in outputs]
        result = client.infer(model, infer_inputs, outputs=requested, **kwargs)
        return {name: result.as_numpy(name) for name in outputs}
    finally:
        client.close()


def as_bytes_array(texts: list[str]) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts], dtype=np.object_)


def as_texts(array: np.ndarray, protocol: str) -> list[str]:
    """BYTES outputs come back as `bytes`, except over HTTP JSON, where tritonclient gives `str`."""
    kind = str if protocol == "http-json" else bytes
    assert all(type(t) is kind for t in array.reshape(-1)), [type(t) for t in array.reshape(-1)]
    return [t if kind is str else t.decode("utf-8") for t in array.reshape(-1)]


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_server_is_ready_with_both_models(server):
    assert server.is_ready()
    states = {m["name"]: m["state"] for m in server.models()}
    assert states == {"echo_sum": "READY", "ort_tok": "READY"}
    assert json.loads(Path(server.state_path).read_text())["pid"] == server.pid


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_echo_sum_returns_exact_values(server, protocol, rng):
    ints = rng.integers(-(2**40), 2**40, size=int(rng.integers(1, 50)), dtype=np.int64)
    floats = rng.standard_normal(int(rng.integers(1, 50))).astype(np.float32)
    texts = random_texts(rng, int(rng.integers(1, 8)))
    out = infer(server, protocol, "echo_sum",
                {"INT_IN": ints, "FLOAT_IN": floats, "TEXT_IN": as_bytes_array(texts)},
                ["INT_SUM", "INT_ECHO", "FLOAT_TWICE", "TEXT_ECHO", "TEXT_UPPER", "TEXT_BYTES"])

    assert out["INT_SUM"].tolist() == [int(ints.sum())]
    np.testing.assert_array_equal(out["INT_ECHO"], ints)
    assert out["FLOAT_TWICE"].dtype == np.float32
    np.testing.assert_array_equal(out["FLOAT_TWICE"], floats * np.float32(2))
    assert as_texts(out["TEXT_ECHO"], protocol) == texts
    assert as_texts(out["TEXT_UPPER"], protocol) == [t.upper() for t in texts]
    assert out["TEXT_BYTES"].tolist() == [len(t.encode("utf-8")) for t in texts]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tokenizers_and_onnxruntime_run_inside_the_stub(server, protocol, rng):
    x = rng.standard_normal(int(rng.integers(1, 64))).astype(np.float32)
    y = rng.standard_normal(x.shape[0]).astype(np.float32)
    query = random_texts(rng, 1)[0]
    documents = random_texts(rng, int(rng.integers(1, 6)))
    out = infer(server, protocol, "ort_tok",
                {"X": x, "Y": y, "QUERY": as_bytes_array([query]), "DOCUMENTS": as_bytes_array(documents)},
                ["Z", "INPUT_IDS", "ATTENTION_MASK", "VERSIONS"])

    np.testing.assert_array_equal(out["Z"], x + y)
    expected = build_tokenizer().encode_batch([(query, d) for d in documents])
    np.testing.assert_array_equal(out["INPUT_IDS"], np.array([e.ids for e in expected], dtype=np.int64))
    np.testing.assert_array_equal(out["ATTENTION_MASK"], np.array([e.attention_mask for e in expected], dtype=np.int64))
    numpy_version, ort_version, _ = as_texts(out["VERSIONS"], protocol)
    assert int(numpy_version.split(".")[0]) < 2, f"the stub imported numpy {numpy_version}: tensors would be corrupt"
    assert ort_version == "1.32.0"


def test_cli_start_status_stop_leaves_nothing_behind(server_env, repository, tmp_path):
    """A second, detached server via the command line, beside the fixture's: state file in, clean exit out."""
    state = tmp_path / "server.state.json"

    def cli(*args):
        env = {**os.environ, triton_env.ENV_VAR: str(server_env.env_dir)}
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=180)

    started = cli("start", "--repo", str(repository), "--log", str(tmp_path / "server.log"), "--state", str(state))
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    try:
        assert info["state_path"] == str(state) and state.exists()
        status = cli("status", "--state", str(state))
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["ready"] is True
        texts = ["only", "strings"]
        inputs = {"INT_IN": np.array([1, 2, 3]), "FLOAT_IN": np.array([0.5], np.float32),
                  "TEXT_IN": as_bytes_array(texts)}
        out = infer(harness.ServerHandle.from_state(state), "http-binary", "echo_sum", inputs, ["INT_SUM", "TEXT_ECHO"])
        assert out["INT_SUM"].tolist() == [6] and out["TEXT_ECHO"].tolist() == [b"only", b"strings"]
        stubs = [p for p in _processes_mentioning(info["shm_prefix"]) if "triton_python_backend_stub" in p]
        assert len(stubs) == 2, stubs  # one stub per model instance
    finally:
        stopped = cli("stop", "--state", str(state))
    assert stopped.returncode == 0, stopped.stderr
    report = json.loads(stopped.stdout)
    assert report["signal"] == "SIGTERM" and report["exited"] and not report["stubs_killed"], report
    assert not _processes_mentioning(info["shm_prefix"])
    assert not processes.is_alive(info["pid"], info["start_time"])
    assert not list(Path("/dev/shm").glob(info["shm_prefix"] + "*"))
    assert not state.exists()
    assert cli("status", "--state", str(state)).returncode == 2  # the state file is gone: a clear error


def test_a_model_that_fails_to_load_fails_the_start_clearly(server_env, tmp_path):
    broken = tmp_path / "repo" / "broken" / "1"
    broken.mkdir(parents=True)
    (broken.parent / "config.pbtxt").write_text(ECHO_SUM_CONFIG)
    (broken / "model.py").write_text(textwrap.dedent("""
        class TritonPythonModel:
            def initialize(self, args):
                raise RuntimeError("initialize exploded on purpose")
        """))
    with pytest.raises(harness.ServerStartError) as failure:
        harness.start_server(tmp_path / "repo", server_env, log_path=tmp_path / "server.log", timeout=60)
    message = str(failure.value)
    assert "broken" in message and "initialize exploded on purpose" in message, message
    assert not _processes_mentioning(str(tmp_path / "repo")), "the failed server was left running"


def test_an_interpreter_without_shared_libpython_is_refused_with_the_fix(monkeypatch):
    info = {"version": "3.11", "full_version": "3.11.7", "shared": 0, "libdir": "/nowhere", "soname": None}
    monkeypatch.setattr(triton_env, "_probe_interpreter", lambda python: info)
    with pytest.raises(triton_env.EnvSetupError, match="--enable-shared"):
        triton_env._check_base_interpreter(Path("/opt/python/bin/python3"))
