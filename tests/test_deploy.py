"""`ettin-export deploy triton`: the generated repository, statically (schema, graph and profile checks,
the TensorRT configuration against a bf16 ONNX export) and against a real Triton server on 127.0.0.1
(python backend, from scripts/triton_server.py): scores over HTTP, gRPC and the /v1/rerank gateway
(`ettin-export serve --triton`) equal the local ONNX Runtime runtime's, concurrent load is batched
across requests with nothing lost, bad requests get 4xx errors and the server answers afterwards.

The server tests skip with the reason when the server env cannot be built; ETTIN_REQUIRE_TRITON=1 (CI)
turns that skip into a failure.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ettin_export.cli import main as cli
from ettin_export.deploy.checks import (
    DeployError,
    check_engine_config,
    signature_from_artifact,
    signature_from_onnx,
)
from ettin_export.deploy.repository import DeployOptions, deploy_triton
from ettin_export.deploy.schema import ConfigError, parse_config
from ettin_runtime import Artifact
from ettin_runtime.errors import EttinError
from .tritonserver import harness, server_env_or_skip

MAX_LENGTH = 128
TRT_MAX_LENGTH = 200  # the TensorRT artifact's: the length the gate's own tests build at (tests/test_build_gate.py)
ENGINE_BATCH = 64  # > the 40 documents of one load-test request: bigger batches prove cross-request batching
CPU_BATCH_TOKENS = 2048  # the front's default on the CPU: onnxruntime.cpu_batch_tokens for a 64-wide model
MAX_DOCUMENTS = 100
QUEUE_DELAY_US = 1000
NAME = "ettin_reranker"
TOLERANCE = 1e-5  # the same fp32 graph on the same machine; only the batch composition differs




# --------------------------------------------------------------------------------------------------
# Artifacts and repositories
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy-artifact") / "cpu"
    status = cli(["build", str(tiny_checkpoint), "--target", "cpu", "--out", str(out), "--max-length", str(MAX_LENGTH),
                  "--max-batch-size", str(ENGINE_BATCH), "--skip-crossencoder-check", "--parity-queries", "2",
                  "--runtime", "onnxruntime", "--quiet"])  # ONNX Runtime: Triton's onnxruntime backend variant too
    assert status == 0
    return out


@pytest.fixture(scope="module")
def local(artifact):
    from ettin_runtime import Reranker

    return Reranker.load(artifact)


@pytest.fixture(scope="module")
def repository(artifact, tmp_path_factory):
    repo = tmp_path_factory.mktemp("deploy-repo") / "models"
    status = cli(["deploy", "triton", str(artifact), "--repo", str(repo), "--allow-random-weights",
                  "--max-documents", str(MAX_DOCUMENTS), "--queue-delay-us", str(QUEUE_DELAY_US), "--with-null-engine"])
    assert status == 0
    return repo


@pytest.fixture(scope="module")
def tensorrt_artifact(tiny_checkpoint, tmp_path_factory):
    """A TensorRT artifact as `build --target h100` writes it (files, manifest, parity report), made by the
    real build path with the engine steps injected (tests/test_build_gate.py's stand-in hooks: the "plan"
    holds the widened bf16 graph). Only the deploy side reads it; nothing here runs a plan."""
    from ettin_export.pipeline import run_build
    from ettin_export.checkpoint import load_checkpoint

    from .test_build_gate import options_for, stand_in_hooks

    out = tmp_path_factory.mktemp("deploy-trt") / "h100"
    options = options_for(out, max_length=TRT_MAX_LENGTH, max_batch_pairs=ENGINE_BATCH)
    assert run_build(lambda: load_checkpoint(str(tiny_checkpoint), max_length=TRT_MAX_LENGTH), options,
                     stand_in_hooks()) == 0
    return out


def copy_with(artifact: Path, directory: Path, *, profile: dict | None = None, **engine) -> Path:
    """A copy of the artifact whose manifest has another engine profile or other engine facts."""
    copy = shutil.copytree(artifact, directory / "artifact")
    manifest = json.loads((copy / "manifest.json").read_text())
    if profile is not None:
        manifest["limits"] = {"profile": profile}
    manifest["engine"].update(engine)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def read_config(repo: Path, model: str):
    return parse_config((repo / model / "config.pbtxt").read_text(), f"{model}/config.pbtxt")


# --------------------------------------------------------------------------------------------------
# Static: the generated repository
# --------------------------------------------------------------------------------------------------


def test_random_weights_are_refused_unless_allowed(artifact, tmp_path, capsys):
    status = cli(["deploy", "triton", str(artifact), "--repo", str(tmp_path / "repo")])
    assert status == 2
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and "--allow-random-weights" in err
    assert not (tmp_path / "repo").exists()


def test_the_repository_is_self_contained(artifact, repository):
    import ettin_runtime.packing

    files = sorted(str(p.relative_to(repository)) for p in repository.rglob("*") if p.is_file())
    front = ["1/ettin_packing.py", "1/model.py", "1/tokenizer/tokenizer.json", "1/tokenizer/tokenizer_config.json",
             "config.pbtxt"]
    assert files == [
        "ettin-deploy.json", *(f"{NAME}/{f}" for f in front), *(f"{NAME}_null/{f}" for f in front),
        f"{NAME}_null_engine/1/model.py", f"{NAME}_null_engine/config.pbtxt",
        f"{NAME}_ort/1/model.onnx", f"{NAME}_ort/1/model.py", f"{NAME}_ort/config.pbtxt",
    ]
    assert not [p for p in repository.rglob("*") if p.is_symlink()]
    assert (repository / NAME / "1" / "ettin_packing.py").read_text() == Path(ettin_runtime.packing.__file__).read_text()
    assert (repository / f"{NAME}_ort/1/model.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()
    marker = json.loads((repository / "ettin-deploy.json").read_text())
    assert marker["engine_model"] == f"{NAME}_ort" and marker["null_reranker_model"] == f"{NAME}_null"
    assert (marker["max_batch_tokens"], marker["max_batch_pairs"]) == (CPU_BATCH_TOKENS, ENGINE_BATCH)
    assert marker["server_args"] == []
    assert marker["python_requirements"] == ["numpy<2", "tokenizers>=0.20,<1", "onnxruntime>=1.17"]
    assert marker["files"][f"{NAME}_ort/1/model.onnx"] == Artifact.open(artifact).files["model.onnx"]


def _packed_inputs(config) -> list:
    return [(i.name, i.data_type, list(i.dims), i.allow_ragged_batch) for i in config.input]


PACKED_INPUTS = [("input_ids", 8, [-1], False), ("cu_seqlens", 8, [-1], False)]  # TYPE_INT32


def test_cpu_configs_parse_and_fit_the_onnx_graph(artifact, repository):
    engine = read_config(repository, f"{NAME}_ort")
    # One packed batch per request, passed through unmerged: the front batches, Triton does not.
    assert engine.backend == "python" and engine.max_batch_size == 0 and not engine.HasField("dynamic_batching")
    assert _packed_inputs(engine) == PACKED_INPUTS and not engine.batch_input
    assert [(o.name, list(o.dims)) for o in engine.output] == [("scores", [-1, 1])]
    engine_parameters = {k: v.string_value for k, v in engine.parameters.items()}
    assert (engine_parameters["max_batch_tokens"], engine_parameters["max_batch_pairs"]) == ("16384", str(ENGINE_BATCH))
    check_engine_config(engine, signature_from_onnx(artifact / "model.onnx"))

    reranker = read_config(repository, NAME)
    assert reranker.backend == "python" and reranker.max_batch_size > 1  # requests share an execute()
    assert reranker.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US
    assert [(i.name, list(i.dims), i.optional) for i in reranker.input] == [
        ("query", [1], False), ("documents", [-1], False), ("top_n", [1], True)]
    assert [(o.name, o.data_type, list(o.dims)) for o in reranker.output] == [
        ("scores", 11, [-1]), ("top_indices", 8, [-1])]
    parameters = {k: v.string_value for k, v in reranker.parameters.items()}
    assert parameters["engine_model"] == f"{NAME}_ort" and parameters["max_length"] == str(MAX_LENGTH)
    assert (parameters["max_batch_tokens"], parameters["max_batch_pairs"]) == (str(CPU_BATCH_TOKENS), str(ENGINE_BATCH))
    null = {k: v.string_value for k, v in read_config(repository, f"{NAME}_null").parameters.items()}
    assert null == {**parameters, "engine_model": f"{NAME}_null_engine"}  # the same front, another engine
    null_engine = read_config(repository, f"{NAME}_null_engine")
    assert _packed_inputs(null_engine) == PACKED_INPUTS and null_engine.max_batch_size == 0


def test_onnxruntime_backend_variant_takes_packed_batches(artifact, tmp_path):
    result = deploy_triton(artifact, DeployOptions(tmp_path / "repo", name="rr", instances=3, cpu_backend="onnxruntime",
                                                   allow_random_weights=True))
    assert result.engine_model == "rr_onnx" and result.null_reranker_model is None
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["ettin-deploy.json", "rr", "rr_onnx"]
    assert sorted(p.name for p in (tmp_path / "repo" / "rr_onnx" / "1").iterdir()) == ["model.onnx"]
    config = read_config(tmp_path / "repo", "rr_onnx")
    assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 0 and _packed_inputs(config) == PACKED_INPUTS and not config.batch_input
    assert config.instance_group[0].count == 3 and config.instance_group[0].kind == 2  # KIND_CPU
    check_engine_config(config, signature_from_onnx(artifact / "model.onnx"))


def test_an_existing_repository_is_replaced_only_with_force(artifact, tmp_path):
    repo = tmp_path / "repo"
    options = DeployOptions(repo, allow_random_weights=True)
    deploy_triton(artifact, options)
    with pytest.raises(DeployError, match="--force"):
        deploy_triton(artifact, options)
    deploy_triton(artifact, DeployOptions(repo, allow_random_weights=True, force=True, name="other"))
    assert sorted(p.name for p in repo.iterdir()) == ["ettin-deploy.json", "other", "other_ort"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(DeployError, match="did not write"):
        deploy_triton(artifact, DeployOptions(foreign, allow_random_weights=True, force=True))
    assert (foreign / "keep.txt").read_text() == "not ours"
    assert not list(tmp_path.glob(".*deploying*"))


def test_the_fronts_budget_is_refused_beyond_the_engines_limits(artifact, tmp_path):
    # The artifact's engine takes at most 64 pairs and 16384 tokens per run; max_length is 128.
    for options, message in (({"max_batch_size": 65}, "max_batch_pairs is 64"),
                             ({"max_batch_tokens": 16385}, "max_batch_tokens is 16384"),
                             ({"max_batch_tokens": MAX_LENGTH - 1}, "below max_length 128"),
                             ({"max_batch_size": 0}, "at least 1")):
        with pytest.raises(DeployError, match=message):
            deploy_triton(artifact, DeployOptions(tmp_path / "r", allow_random_weights=True, **options))
        assert not (tmp_path / "r").exists()
    budget = deploy_triton(artifact, DeployOptions(tmp_path / "r", max_batch_size=8, max_batch_tokens=4096,
                                                   allow_random_weights=True)).budget
    assert (budget.max_pairs, budget.max_tokens) == (8, 4096)
    front = {k: v.string_value for k, v in read_config(tmp_path / "r", NAME).parameters.items()}
    assert (front["max_batch_pairs"], front["max_batch_tokens"]) == ("8", "4096")


# --------------------------------------------------------------------------------------------------
# Static: TensorRT
# --------------------------------------------------------------------------------------------------


def test_tensorrt_config_fits_the_engine_and_its_profile(tensorrt_artifact, tmp_path):
    manifest = Artifact.open(tensorrt_artifact)
    # What the build leaves: the plan, no ONNX; the manifest's graph record is what deploy checks against.
    assert manifest.engine.format == "tensorrt" and manifest.engine.file == "model.plan"
    assert not list(tensorrt_artifact.glob("*.onnx")) and (tensorrt_artifact / "parity.json").is_file()
    graph = signature_from_artifact(manifest)
    assert graph.inputs["input_ids"].dtype == "int32" and graph.outputs["scores"].dtype == "float32"
    result = deploy_triton(tensorrt_artifact, DeployOptions(tmp_path / "repo", instances=2, allow_random_weights=True))
    repo = tmp_path / "repo"
    profile = manifest.limits.profile
    assert result.engine_model == f"{NAME}_trt"
    # On the GPU the front packs up to the profile's maxima: every engine request fits the plan.
    assert (result.budget.max_tokens, result.budget.max_pairs) == (profile.max_tokens, profile.max_pairs)
    assert result.tensorrt_version == manifest.engine.tensorrt.tensorrt_version
    assert result.python_requirements == ["numpy<2", "tokenizers>=0.20,<1"]
    assert sorted(str(p.relative_to(repo)) for p in (repo / f"{NAME}_trt").rglob("*") if p.is_file()) == [
        f"{NAME}_trt/1/model.sm90.plan", f"{NAME}_trt/config.pbtxt"]
    assert (repo / f"{NAME}_trt/1/model.sm90.plan").read_bytes() == (tensorrt_artifact / "model.plan").read_bytes()
    config = read_config(repo, f"{NAME}_trt")
    assert config.platform == "tensorrt_plan"
    assert dict(config.cc_model_filenames) == {"9.0": "model.sm90.plan"}
    assert config.max_batch_size == 0 and _packed_inputs(config) == PACKED_INPUTS and not config.batch_input
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("scores", 11, [-1, 1])]
    assert not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == 1 and config.instance_group[0].count == 2  # KIND_GPU
    check_engine_config(config, graph)
    reranker = {k: v.string_value for k, v in read_config(repo, NAME).parameters.items()}
    assert reranker["engine_model"] == f"{NAME}_trt"
    assert (int(reranker["max_batch_tokens"]), int(reranker["max_batch_pairs"])) == (profile.max_tokens,
                                                                                    profile.max_pairs)
    assert profile.max_tokens >= manifest.max_length  # at least one full-length pair per run


def _comment(text: str) -> str:
    """The comment lines of a config.pbtxt, joined back into prose."""
    return " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))


def test_engine_configs_say_one_packed_batch_per_request(tensorrt_artifact, artifact, tmp_path):
    deploy_triton(tensorrt_artifact, DeployOptions(tmp_path / "trt", allow_random_weights=True))
    trt = _comment((tmp_path / "trt" / f"{NAME}_trt" / "config.pbtxt").read_text())
    assert "ONE packed batch each" in trt and "cu_seqlens INT32 [B+1]" in trt and "max_batch_size is 0" in trt
    assert "refuses a request whose shapes are outside the plan's optimization profile" in trt
    assert "keep this model's endpoint internal" in trt
    version = Artifact.open(tensorrt_artifact).engine.tensorrt.tensorrt_version
    assert f"The plan loads only in TensorRT {version}" in trt and "nvcr.io/nvidia/tritonserver" in trt
    deploy_triton(artifact, DeployOptions(tmp_path / "ort", allow_random_weights=True))
    ort = _comment((tmp_path / "ort" / f"{NAME}_ort" / "config.pbtxt").read_text())
    assert "ONE packed batch each" in ort and "gets a 400" in ort and "TensorRT" not in ort


def test_deploy_says_which_container_and_driver_and_warns_on_leaking_releases(tensorrt_artifact, tmp_path, capsys):
    for version, leaks in (("10.13.3.9", False), ("11.1.0.106", True), ("11.2.1.2", True)):
        artifact = copy_with(tensorrt_artifact, tmp_path / version, tensorrt_version=version, ptx_version="8.4",
                             ptx_target="sm_90a", driver_version="550.54.15", cuda_driver_version=12040)
        repo = tmp_path / version / "repo"
        assert cli(["deploy", "triton", str(artifact), "--repo", str(repo), "--allow-random-weights"]) == 0
        out, err = capsys.readouterr()
        assert f"loads only in TensorRT {version}" in out and "nvcr.io/nvidia/tritonserver:<yy.mm>-py3" in out
        assert "PTX ISA 8.4 for sm_90a" in out and "support CUDA 12.4 or newer" in out
        assert ("NVIDIA/TensorRT#4849" in err) is leaks, version
        marker = json.loads((repo / "ettin-deploy.json").read_text())
        assert bool(marker["warnings"]) is leaks and marker["serving_notes"]
        assert marker["tensorrt_version"] == version


@pytest.mark.parametrize("profile, requested, message", [
    ({"total_tokens": [1, 1024, 4096], "num_pairs_plus_1": [2, 17, 65]}, {"max_batch_tokens": 4097},
     "the profile's max_batch_tokens is 4096"),
    ({"total_tokens": [1, 2048, 8192], "num_pairs_plus_1": [2, 9, 17]}, {"max_batch_size": 17},
     "the profile's max_batch_pairs is 16"),
    ({"total_tokens": [1, 64, 100], "num_pairs_plus_1": [2, 2, 65]}, {}, "cannot hold even one full-length pair"),
    ({"total_tokens": [64, 1024, 8192], "num_pairs_plus_1": [2, 17, 65]}, {}, "above a single shortest pair"),
    ({"total_tokens": [1, 1024, 8192], "num_pairs_plus_1": [3, 17, 65]}, {}, "above a single shortest pair"),
    ({"total_tokens": [1, 2048], "num_pairs_plus_1": [2, 17, 65]}, {}, "expected \\[min, opt, max\\]"),
])
def test_tensorrt_profile_violations_are_refused(tensorrt_artifact, tmp_path, profile, requested, message):
    artifact = copy_with(tensorrt_artifact, tmp_path, profile=profile)
    with pytest.raises(EttinError, match=message):  # DeployError, or ArtifactError for a malformed profile
        deploy_triton(artifact, DeployOptions(tmp_path / "repo", allow_random_weights=True, **requested))
    assert not (tmp_path / "repo").exists()


def test_the_tensorrt_front_packs_up_to_a_smaller_profiles_maxima(tensorrt_artifact, tmp_path):
    """Short pairs pack many to a run: the front's budget is the profile's tokens and pairs, not
    pairs x max_length (which would cap this profile at 20 pairs of 200 tokens)."""
    artifact = copy_with(tensorrt_artifact, tmp_path,
                         profile={"total_tokens": [1, 1024, 4096 + 100], "num_pairs_plus_1": [2, 17, 65]})
    budget = deploy_triton(artifact, DeployOptions(tmp_path / "repo", allow_random_weights=True)).budget
    assert (budget.max_tokens, budget.max_pairs) == (4196, 64)


def test_the_budget_check_catches_a_front_beyond_the_profile(tensorrt_artifact):
    from ettin_export.deploy.checks import check_budget

    manifest = Artifact.open(tensorrt_artifact)
    tokens, pairs = manifest.limits.profile.max_tokens, manifest.limits.profile.max_pairs
    assert check_budget({"max_batch_tokens": str(tokens), "max_batch_pairs": str(pairs)}, manifest) == []
    (problem,) = check_budget({"max_batch_tokens": str(tokens + 1), "max_batch_pairs": str(pairs)}, manifest)
    assert f"up to {tokens + 1} tokens" in problem and f"the profile's max_batch_tokens {tokens}" in problem
    (problem,) = check_budget({"max_batch_tokens": str(tokens), "max_batch_pairs": str(pairs + 1)}, manifest)
    assert f"the profile's max_batch_pairs is {pairs}" in problem
    (problem,) = check_budget({"max_batch_tokens": str(TRT_MAX_LENGTH - 1), "max_batch_pairs": "1"}, manifest)
    assert f"max_length {TRT_MAX_LENGTH}" in problem
    assert check_budget({"max_batch_pairs": "1"}, manifest)  # missing: a problem, not a pass


def test_an_unfinished_onnx_only_artifact_is_refused_with_its_finish_command(artifact, tmp_path):
    unfinished = tmp_path / "artifact"
    shutil.copytree(artifact, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest["engine"].update(complete=False, finish_command="ettin-export build CKPT --target h100 --force")
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeployError, match="unfinished.*--target h100 --force"):
        deploy_triton(unfinished, DeployOptions(tmp_path / "repo", allow_random_weights=True))


def test_tensorrt_artifact_without_compute_capability_is_refused(tensorrt_artifact, tmp_path):
    artifact = copy_with(tensorrt_artifact, tmp_path, compute_capability=None)
    with pytest.raises(EttinError, match="compute_capability"):
        deploy_triton(artifact, DeployOptions(tmp_path / "repo", allow_random_weights=True))


def _mutated(text: str, old: str, new: str):
    assert old in text
    return parse_config(text.replace(old, new, 1), "mutated")


@pytest.mark.parametrize("old, new, message", [
    ('name: "input_ids"\n  data_type: TYPE_INT32', 'name: "input_ids"\n  data_type: TYPE_INT64',
     "TYPE_INT64 but the graph's is int32"),
    ('name: "ettin_reranker_trt"\n', 'name: "ettin_reranker_trt"\nmax_batch_size: 8\n', "use max_batch_size 0"),
    ('name: "ettin_reranker_trt"\n', 'name: "ettin_reranker_trt"\ndynamic_batching {\n}\n', "dynamic_batching is set"),
    ('name: "cu_seqlens"', 'name: "offsets"', "'offsets' is not a graph input"),
    ('name: "cu_seqlens"\n  data_type: TYPE_INT32\n  dims: -1\n',
     'name: "cu_seqlens"\n  data_type: TYPE_INT32\n  dims: -1\n  allow_ragged_batch: true\n',
     "allow_ragged_batch would concatenate requests"),
    ('name: "cu_seqlens"\n  data_type: TYPE_INT32\n  dims: -1', 'name: "cu_seqlens"\n  data_type: TYPE_INT32\n  dims: 5',
     "input cu_seqlens: dims [5]"),
    ("dims: -1\n  dims: 1\n}", "dims: -1\n  dims: 2\n}", "output scores: dims [-1, 2]"),
    ("dims: -1\n  dims: 1\n}", "dims: 1\n}", "output scores: dims [1]"),
    ("data_type: TYPE_FP32", "data_type: TYPE_BF16", "TYPE_BF16 but the graph's is float32"),
])
def test_engine_cross_check_catches_config_mistakes(tensorrt_artifact, tmp_path, old, new, message):
    deploy_triton(tensorrt_artifact, DeployOptions(tmp_path / "repo", allow_random_weights=True))
    text = (tmp_path / "repo" / f"{NAME}_trt" / "config.pbtxt").read_text()
    check_engine_config(parse_config(text, "as generated"), signature_from_artifact(Artifact.open(tensorrt_artifact)))
    config = _mutated(text, old, new)
    graph = signature_from_artifact(Artifact.open(tensorrt_artifact))
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("]", "\\]")):
        check_engine_config(config, graph)


@pytest.mark.parametrize("old, new, message", [
    ("max_batch_size: 32", "max_batch_sise: 32", 'no field named "max_batch_sise"'),
    ("TYPE_INT32", "TYPE_BFLOAT16", 'no value named TYPE_BFLOAT16'),
])
def test_schema_rejects_typos(repository, old, new, message):
    with pytest.raises(ConfigError, match=message):
        _mutated((repository / NAME / "config.pbtxt").read_text(), old, new)


def test_the_command_module_imports_nothing_heavy():
    import subprocess

    heavy = ("torch", "onnx", "google.protobuf", "tritonclient", "onnxruntime")
    code = ("import sys, ettin_export.commands.deploy as d, argparse; d.add_arguments(argparse.ArgumentParser()); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# A real server
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_env():
    return server_env_or_skip()


@pytest.fixture(scope="module")
def server(server_env, repository, tmp_path_factory):
    logs = tmp_path_factory.mktemp("deploy-logs")
    # The flags the repository asks for (the python backend's BLS threads per instance), as a user would.
    server_args = json.loads((repository / "ettin-deploy.json").read_text())["server_args"]
    handle = harness.start_server(repository, server_env, log_path=logs / "server.log", die_with_parent=True,
                                  extra_args=server_args)
    try:
        yield handle
    finally:
        report = handle.stop()
        assert report["exited"], f"the server did not exit: {report}\n{handle.log_tail()}"
        assert not report["stubs_killed"], report
        assert not list(Path("/dev/shm").glob(handle.shm_prefix + "*")), report


@pytest.fixture(params=["http", "grpc"])
def remote(request, server):
    from ettin_runtime.triton_client import TritonReranker

    url = server.http_address if request.param == "http" else server.grpc_url
    with TritonReranker(url, NAME, protocol=request.param, batch_size=16) as reranker:
        yield reranker


def make_texts(rng, count: int, low: int = 1, high: int = 60) -> list[str]:
    from ettin_export.synthetic.text import random_sentence

    words = random.Random(int(rng.integers(2**31)))
    return [random_sentence(words, int(rng.integers(low, high))) for _ in range(count)]


def test_scores_equal_the_local_runtime_in_document_order(remote, local):
    rng = np.random.default_rng(1)
    queries = make_texts(rng, 4, 2, 12)
    documents = make_texts(rng, 45) + ["", "x" * 3000, "a b c " * 200]  # empty, and truncated ones
    # Interleaved queries, a repeated pair, more documents per query than batch_size: order must survive.
    pairs = [(queries[i % 4], doc) for i, doc in enumerate(documents)] + [(queries[0], documents[0])]
    expected = local.predict(pairs)
    got = remote.predict(pairs)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    assert expected.std() > 1.0  # the bound means something only if scores spread
    np.testing.assert_allclose(remote.predict(pairs[:5], activation="sigmoid"),
                               local.predict(pairs[:5], activation="sigmoid"), atol=TOLERANCE)
    assert remote.predict([]).shape == (0,)


def test_the_triton_client_keeps_the_runtime_contract(remote, local):
    """The same assertions as every local backend (tests/contract.py), against the real server."""
    from .contract import check_contract, contract_pairs

    pairs = contract_pairs(seed=23)
    check_contract(remote, pairs, local.predict(pairs), max_length=MAX_LENGTH)


def test_top_n_agrees_with_rank(remote, local):
    rng = np.random.default_rng(2)
    query, documents = make_texts(rng, 1)[0], make_texts(rng, 30)
    expected = local.rank(query, documents, top_k=7, return_documents=True)
    ranked = remote.rank(query, documents, top_k=7, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in expected]
    assert [r["text"] for r in ranked] == [r["text"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in ranked], [r["score"] for r in expected], atol=TOLERANCE)
    served = remote.rerank(query, documents, top_n=7)
    assert served.top_indices.dtype == np.int32 and served.top_indices.tolist() == [r["corpus_id"] for r in expected]
    assert remote.rerank(query, documents).top_indices.shape == (30,)  # no top_n: every document
    assert remote.rerank(query, documents[:3], top_n=10).top_indices.shape == (3,)


def test_client_input_errors_match_the_local_runtime(remote, local):
    from ettin_runtime.packing import PairInputError

    with pytest.raises(TypeError, match="list of pairs"):
        remote.predict(("query", "document"))
    with pytest.raises(PairInputError, match="Pair 1"):
        remote.predict([("q", "d"), ("q", 3)])
    with pytest.raises(TypeError):
        remote.rank("q", "not a list")
    assert remote.rank("q", []) == local.rank("q", []) == []


# --------------------------------------------------------------------------------------------------
# Bad requests, straight through tritonclient
# --------------------------------------------------------------------------------------------------


def _raw_infer(server, protocol: str, model: str, inputs: dict[str, tuple[np.ndarray, str]]):
    if protocol == "grpc":
        import tritonclient.grpc as module

        client = module.InferenceServerClient(server.grpc_url, channel_args=harness.GRPC_LOOPBACK_CHANNEL_ARGS)
    else:
        import tritonclient.http as module

        client = module.InferenceServerClient(server.http_address)
    try:
        tensors = []
        for name, (array, datatype) in inputs.items():
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return client.infer(model, tensors)
    finally:
        client.close()


def _strings(*texts, raw: bool = False) -> np.ndarray:
    return np.array([t if raw else t.encode("utf-8") for t in texts], dtype=np.object_).reshape(1, -1)


BAD_REQUESTS = {
    "no query": ({"documents": (_strings("a doc"), "BYTES")}, "query"),
    "no documents": ({"query": (_strings("q"), "BYTES")}, "documents"),
    "empty documents": ({"query": (_strings("q"), "BYTES"),
                         "documents": (np.empty((1, 0), dtype=np.object_), "BYTES")}, "'documents' is empty"),
    "query is not a string": ({"query": (np.array([[7]], np.int32), "INT32"),
                               "documents": (_strings("a"), "BYTES")}, "query"),
    "documents are not strings": ({"query": (_strings("q"), "BYTES"),
                                   "documents": (np.ones((1, 2), np.float32), "FP32")}, "documents"),
    "top_n is not an integer": ({"query": (_strings("q"), "BYTES"), "documents": (_strings("a"), "BYTES"),
                                 "top_n": (np.ones((1, 1), np.float32), "FP32")}, "top_n"),
    "top_n below 1": ({"query": (_strings("q"), "BYTES"), "documents": (_strings("a"), "BYTES"),
                       "top_n": (np.zeros((1, 1), np.int32), "INT32")}, "top_n must be at least 1"),
    "two queries": ({"query": (_strings("q", "r"), "BYTES"), "documents": (_strings("a"), "BYTES")}, "query"),
    "not UTF-8": ({"query": (_strings("q"), "BYTES"), "documents": (_strings(b"ok", b"\xff\xfe", raw=True), "BYTES")},
                  "documents\\[1\\] is not valid UTF-8"),
    "too many documents": ({"query": (_strings("q"), "BYTES"),
                            "documents": (_strings(*["d"] * (MAX_DOCUMENTS + 1)), "BYTES")}, "at most 100"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_400s_and_the_server_answers_afterwards(server, local, protocol):
    from tritonclient.utils import InferenceServerException

    expected_status = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    for case, (inputs, message) in BAD_REQUESTS.items():
        with pytest.raises(InferenceServerException) as failure:
            _raw_infer(server, protocol, NAME, inputs)
        assert failure.value.status() == expected_status, (case, failure.value)
        assert re.search(message, failure.value.message()), (case, failure.value.message())

    huge = "relevant passage about cats " * 3600  # 100,800 characters: truncated to max_length, never refused
    assert len(huge) >= 100_000
    documents = ["cats", huge, "dogs"]
    result = _raw_infer(server, protocol, NAME, {"query": (_strings("cats"), "BYTES"),
                                                 "documents": (_strings(*documents), "BYTES"),
                                                 "top_n": (np.array([[2]], np.int32), "INT32")})
    expected = local.predict([("cats", d) for d in documents])
    np.testing.assert_allclose(result.as_numpy("scores")[0], expected, atol=TOLERANCE)
    assert result.as_numpy("top_indices").tolist() == [np.argsort(-expected, kind="stable")[:2].tolist()]
    assert server.is_ready() and {m["state"] for m in server.models()} == {"READY"}


def test_client_reports_server_errors_with_their_status(server):
    from ettin_runtime.triton_client import TritonReranker, TritonRerankerError

    with TritonReranker(server.http_address, NAME) as reranker:
        with pytest.raises(TritonRerankerError, match="'documents' is empty") as failure:
            reranker.rerank("q", [])
        assert failure.value.status == "400"
    with pytest.raises(TritonRerankerError, match="not a reranker"):
        TritonReranker(server.http_address, f"{NAME}_ort").close()


@pytest.mark.parametrize("ids, offsets, message", [
    (np.array([1, 2, 3], np.int32), np.array([0, 2], np.int32), "end at T=3"),
    (np.array([1, 2, 3], np.int32), np.array([0, 0, 3], np.int32), "rise by at least 1"),
    (np.array([1, 2, 3], np.int32), np.array([1, 3], np.int32), "start at 0"),
    (np.array([[1, 2], [3, 4]], np.int32), np.array([0, 4], np.int32), "Expected \\[-1\\], got \\[2,2\\]"),  # Triton's
    (np.array([1, 10**6], np.int32), np.array([0, 2], np.int32), "token ids must be in"),
    (np.ones(MAX_LENGTH + 1, np.int32), np.array([0, MAX_LENGTH + 1], np.int32), "expected 1 to max_length"),
    (np.ones(16385, np.int32), np.arange(0, 16385 + 1, 16385 // 5, dtype=np.int32)[:6], "at most 64 pairs and 16384"),
    (np.ones(65, np.int32), np.arange(66, dtype=np.int32), "at most 64 pairs"),
])
def test_the_engine_model_refuses_what_it_cannot_run(server, local, ids, offsets, message):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=message) as failure:
        _raw_infer(server, "http", f"{NAME}_ort", {"input_ids": (ids, "INT32"), "cu_seqlens": (offsets, "INT32")})
    assert failure.value.status() == "400"
    # ... and then runs a packed batch it can, with the local runtime's scores for the same pairs.
    from ettin_runtime.packing import pack

    pairs = [("q", "a short document"), ("another query", "x " * 400), ("q", "")]
    batch = pack(local.encoder.encode(pairs))
    result = _raw_infer(server, "http", f"{NAME}_ort", {"input_ids": (batch.input_ids, "INT32"),
                                                        "cu_seqlens": (batch.cu_seqlens, "INT32")})
    assert result.as_numpy("scores").shape == (3, 1)
    np.testing.assert_allclose(result.as_numpy("scores")[:, 0], local.predict(pairs), rtol=0, atol=TOLERANCE)


def test_single_pair_requests_share_engine_executions(server):
    """16 one-document requests at once. Each pair reaches the engine in exactly one execution, so fewer
    engine executions than requests means that some execution held pairs of different requests."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(server.grpc_url, channel_args=harness.GRPC_LOOPBACK_CHANNEL_ARGS)
    done, results = threading.Semaphore(0), []
    before, front_before = server.model_stats(f"{NAME}_ort"), server.model_stats(NAME)
    try:
        for number in range(16):
            inputs = []
            for name, texts in (("query", [f"query {number}"]), ("documents", [f"document {number}"])):
                tensor = grpc.InferInput(name, [1, 1], "BYTES")
                tensor.set_data_from_numpy(_strings(*texts))
                inputs.append(tensor)
            client.async_infer(NAME, inputs, callback=lambda result, error: (results.append(error), done.release()))
        for _ in range(16):
            assert done.acquire(timeout=60)
    finally:
        client.close()
    assert results == [None] * 16
    engine, front = server.model_stats(f"{NAME}_ort").since(before), server.model_stats(NAME).since(front_before)
    assert front.inferences == front.success == 16 and front.executions < 16, front
    assert engine.executions == engine.inferences < 16, engine  # one packed batch per engine request


def test_the_null_front_answers_like_the_front_with_constant_scores(server):
    from ettin_runtime.triton_client import TritonReranker

    rng = np.random.default_rng(4)
    documents = make_texts(rng, 37) + ["", "x" * 3000]
    with TritonReranker(server.grpc_url, f"{NAME}_null", protocol="grpc") as null:
        result = null.rerank("a query", documents, top_n=5)
    assert result.scores.shape == (len(documents),) and not result.scores.any()
    assert result.top_indices.tolist() == [0, 1, 2, 3, 4]  # ties: lower index first


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------

CLIENTS, REQUESTS_PER_CLIENT, MAX_DOCS_PER_REQUEST, TOP_N = 8, 50, 40, 5


def test_concurrent_load_is_batched_across_requests_and_nothing_is_lost(server, local):
    from ettin_runtime.triton_client import TritonReranker

    rng = np.random.default_rng(3)
    workload = {}  # (client, request) -> (query, documents)
    for client in range(CLIENTS):
        for number in range(REQUESTS_PER_CLIENT):
            count = int(rng.integers(1, MAX_DOCS_PER_REQUEST + 1))
            # A request-unique tag in every document: a score delivered to the wrong request cannot pass.
            documents = [f"{text} r{client}x{number}d{i}" for i, text in enumerate(make_texts(rng, count, 1, 16))]
            workload[client, number] = (make_texts(rng, 1, 2, 10)[0], documents)
    total_pairs = sum(len(docs) for _, docs in workload.values())
    engine_before, reranker_before = server.model_stats(f"{NAME}_ort"), server.model_stats(NAME)
    answers: dict = {}
    failures: list = []
    lock = threading.Lock()

    def run_client(client: int) -> None:
        protocol = "grpc" if client % 2 else "http"
        url = server.grpc_url if protocol == "grpc" else server.http_address
        try:
            with TritonReranker(url, NAME, protocol=protocol) as reranker:
                for number in range(REQUESTS_PER_CLIENT):
                    query, documents = workload[client, number]
                    result = reranker.rerank(query, documents, top_n=TOP_N)
                    with lock:
                        assert (client, number) not in answers
                        answers[client, number] = result
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append((client, repr(exc)))

    started = time.perf_counter()
    threads = [threading.Thread(target=run_client, args=(c,)) for c in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    seconds = time.perf_counter() - started
    assert not failures, failures
    assert not any(t.is_alive() for t in threads)
    engine = server.model_stats(f"{NAME}_ort").since(engine_before)
    reranker = server.model_stats(NAME).since(reranker_before)

    assert sorted(answers) == sorted(workload)  # every request answered once
    pairs = [(query, doc) for query, documents in workload.values() for doc in documents]
    expected_all = local.predict(pairs)
    offset = 0
    for key, (query, documents) in workload.items():
        expected = expected_all[offset:offset + len(documents)]
        offset += len(documents)
        got = answers[key]
        assert got.scores.shape == (len(documents),), key
        np.testing.assert_allclose(got.scores, expected, rtol=0, atol=TOLERANCE, err_msg=str(key))
        top = np.argsort(-expected, kind="stable")[:TOP_N]
        # The same ranking, unless two scores are closer than the tolerance (then either order is right).
        assert all(a == b or abs(expected[a] - expected[b]) <= 2 * TOLERANCE
                   for a, b in zip(got.top_indices.tolist(), top.tolist())), key

    report = {"requests": len(workload), "pairs": total_pairs, "seconds": round(seconds, 2),
              "pairs_per_second": round(total_pairs / seconds), "engine": engine.to_json(),
              "reranker": reranker.to_json()}
    print("load:", json.dumps(report))
    assert reranker.inferences == reranker.success == len(workload)
    assert engine.inferences == engine.success == engine.executions  # one packed batch per request
    # Every request's pairs reached the engine (each score checked above, tagged per request), so were every
    # engine execution one request's pairs there would be at least one execution per request.
    assert engine.executions < len(workload), report
    assert reranker.executions < reranker.inferences, report  # requests shared a front execute()


# --------------------------------------------------------------------------------------------------
# POST /v1/rerank: `ettin-export serve --triton` beside the server
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    """The gateway as a user starts it: one command, gRPC to the server."""
    from .gateway_client import start_gateway

    with start_gateway(["--triton", server.grpc_url], tmp_path_factory.mktemp("gateway") / "gateway.log") as url:
        yield url


def test_v1_rerank_scores_equal_the_local_runtime(gateway, local, artifact):
    from .gateway_client import post

    rng = np.random.default_rng(5)
    query = make_texts(rng, 1, 2, 12)[0]
    documents = make_texts(rng, 33) + ["", "x" * 3000, "café 日本語 🙂"]
    raw = local.predict([(query, d) for d in documents])
    assert raw.std() > 1.0
    order = np.argsort(-raw, kind="stable")

    status, body = post(gateway + "/v1/rerank", {"query": query, "documents": documents, "raw_scores": True})
    assert status == 200 and body["model"] == Artifact.open(artifact).source.model, body
    assert [r["index"] for r in body["results"]] == order.tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], raw[order], rtol=0, atol=TOLERANCE)
    assert all("document" not in r for r in body["results"]) and len(body["id"]) == 32

    # Default: sigmoid of the logit (float32), the top_n best, documents echoed as Cohere does.
    status, body = post(gateway + "/v1/rerank", {"query": query, "documents": [{"text": d} for d in documents],
                                                 "top_n": 7, "return_documents": True, "model": "anything"})
    assert status == 200
    sigmoid = local.predict([(query, d) for d in documents], activation="sigmoid")
    assert [r["index"] for r in body["results"]] == order[:7].tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], sigmoid[order[:7]], rtol=0, atol=1e-6)
    assert [r["document"]["text"] for r in body["results"]] == [documents[i] for i in order[:7]]

    # TEI's own form: `texts`, a bare array of {index, score, text}.
    status, ranks = post(gateway + "/rerank", {"query": query, "texts": documents[:5], "raw_scores": True,
                                               "return_text": True})
    assert status == 200 and isinstance(ranks, list)
    expected = np.argsort(-raw[:5], kind="stable")
    assert [r["index"] for r in ranks] == expected.tolist()
    np.testing.assert_allclose([r["score"] for r in ranks], raw[:5][expected], rtol=0, atol=TOLERANCE)
    assert [r["text"] for r in ranks] == [documents[i] for i in expected]


BAD_BODIES = {
    "not JSON": (b"{'query': 1", 400, "Validation", "not JSON"),
    "not an object": ([1, 2], 422, "Validation", "JSON object"),
    "no query": ({"documents": ["a"]}, 422, "Validation", "`query` is required"),
    "query not a string": ({"query": 3, "documents": ["a"]}, 422, "Validation", "`query` must be a string"),
    "no documents": ({"query": "q"}, 422, "Validation", "`documents` is required"),
    "documents not a list": ({"query": "q", "documents": "a"}, 422, "Validation", "must be a list"),
    "empty documents": ({"query": "q", "documents": []}, 400, "Empty", "cannot be empty"),
    "a document not a string": ({"query": "q", "documents": ["a", 5]}, 422, "Validation", "`documents\\[1\\]`"),
    "both lists": ({"query": "q", "documents": ["a"], "texts": ["a"]}, 422, "Validation", "not both"),
    "too many documents": ({"query": "q", "documents": ["d"] * (MAX_DOCUMENTS + 1)}, 413, "Validation",
                           f"maximum allowed batch size {MAX_DOCUMENTS}"),
    "top_n zero": ({"query": "q", "documents": ["a"], "top_n": 0}, 422, "Validation", "`top_n`"),
    "top_n not an integer": ({"query": "q", "documents": ["a"], "top_n": "3"}, 422, "Validation", "`top_n`"),
    "raw_scores not a bool": ({"query": "q", "documents": ["a"], "raw_scores": "yes"}, 422, "Validation",
                              "`raw_scores`"),
    "truncate false": ({"query": "q", "documents": ["a"], "truncate": False}, 422, "Validation", "always truncated"),
    "too large": ({"query": "q", "documents": ["x" * 2_100_000]}, 413, "Validation", "bytes"),
}


def test_v1_rerank_bad_requests_get_4xx_json_and_the_gateway_answers_afterwards(gateway, local):
    from .gateway_client import post, request

    for case, (body, status, error_type, message) in BAD_BODIES.items():
        got_status, got = post(gateway + "/v1/rerank", body)
        assert got_status == status and got["error_type"] == error_type, (case, got_status, got)
        assert re.search(message, got["error"]), (case, got)
    assert request(gateway + "/v1/rerank", method="GET")[0] == 405
    assert request(gateway + "/v2/nothing", method="POST", data=b"{}")[0] == 404
    # A document far beyond max_length is truncated, not refused; the answer is right.
    documents = ["cats", "relevant passage about cats " * 3600, "dogs"]
    status, body = post(gateway + "/v1/rerank", {"query": "cats", "documents": documents, "raw_scores": True})
    expected = local.predict([("cats", d) for d in documents])
    assert status == 200
    np.testing.assert_allclose([r["relevance_score"] for r in sorted(body["results"], key=lambda r: r["index"])],
                               expected, rtol=0, atol=TOLERANCE)
    assert request(gateway + "/health")[0] == 200
    status, info = request(gateway + "/info")
    assert status == 200 and info["max_client_batch_size"] == MAX_DOCUMENTS and info["max_input_length"] == MAX_LENGTH


def test_v1_rerank_under_concurrent_clients_loses_nothing(gateway, local):
    from .gateway_client import post

    rng = np.random.default_rng(6)
    work = [(make_texts(rng, 1, 2, 8)[0], [f"{t} tag{n}d{i}" for i, t in enumerate(make_texts(rng, int(k), 1, 12))])
            for n, k in enumerate(rng.integers(1, 20, size=48))]
    answers, failures = {}, []

    def client(first: int) -> None:
        for number in range(first, len(work), 6):
            query, documents = work[number]
            status, body = post(gateway + "/v1/rerank", {"query": query, "documents": documents, "raw_scores": True})
            if status != 200:
                failures.append((number, status, body))
            answers[number] = body

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures and sorted(answers) == list(range(len(work)))
    for number, (query, documents) in enumerate(work):
        expected = local.predict([(query, d) for d in documents])
        got = sorted(answers[number]["results"], key=lambda r: r["index"])
        assert [r["index"] for r in got] == list(range(len(documents)))
        np.testing.assert_allclose([r["relevance_score"] for r in got], expected, rtol=0, atol=TOLERANCE)
