"""One runtime contract (ettin_runtime.reranker), the same assertions (tests/contract.py) on every local
backend this machine can run: ONNX Runtime and OpenVINO on an artifact, the packed PyTorch model on the checkpoint,
and TensorRTReranker over a stand-in engine session (ONNX Runtime runs the graph inside it: this checks
the TensorRT runtime's side of the contract — profile limits, order, close — not TensorRT). The Triton
client runs the same assertions against a real server in tests/test_deploy.py."""

from __future__ import annotations

import numpy as np
import pytest

from ettin_runtime import Artifact, Reranker
from ettin_runtime.artifact import Limits

from .contract import check_contract, contract_pairs

MAX_LENGTH = 200  # tiny_artifact's


class OnnxEngineSession:
    """A stand-in for the TensorRT EngineSession: `run` and `limits`, computed by ONNX Runtime."""

    def __init__(self, artifact: Artifact, limits: Limits):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(artifact.path(artifact.engine.file)),
                                                    providers=["CPUExecutionProvider"])
        self.limits = limits
        self.closed = 0

    def run(self, input_ids, cu_seqlens):
        assert len(cu_seqlens) - 1 <= self.limits.max_batch_pairs and len(input_ids) <= self.limits.max_batch_tokens
        (scores,) = self.session.run(["scores"], {"input_ids": input_ids, "cu_seqlens": cu_seqlens})
        return scores.reshape(-1)

    def close(self):
        self.closed += 1


def _open(kind: str, tiny_artifact, tiny_checkpoint):
    if kind == "onnxruntime":
        return Reranker.load(tiny_artifact)
    if kind == "openvino":
        pytest.importorskip("openvino", reason="pip install 'ettin-export[openvino]'")
        return Reranker.load(tiny_artifact, runtime="openvino")  # the same fp32 graph, read by OpenVINO
    if kind == "torch":
        from ettin_export.model.torch_reranker import TorchReranker

        return TorchReranker.from_checkpoint(str(tiny_checkpoint), max_length=MAX_LENGTH)
    from ettin_runtime.backends.tensorrt import TensorRTReranker
    from ettin_runtime.packing import PairEncoder

    artifact = Artifact.open(tiny_artifact)
    session = OnnxEngineSession(artifact, Limits(max_batch_pairs=7, max_batch_tokens=900))
    return TensorRTReranker(session, PairEncoder.from_dir(artifact.root, artifact.max_length), artifact)


@pytest.fixture(scope="module")
def expected(tiny_artifact):
    pairs = contract_pairs(seed=17)
    with Reranker.load(tiny_artifact) as reference:
        return pairs, reference.predict(pairs)


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino", "torch", "tensorrt (stand-in engine session)"])
def test_every_local_backend_keeps_the_contract(kind, tiny_artifact, tiny_checkpoint, expected):
    pairs, scores = expected
    reranker = _open(kind, tiny_artifact, tiny_checkpoint)
    with reranker:
        check_contract(reranker, pairs, scores, max_length=MAX_LENGTH)
    reranker.close()  # idempotent


def test_a_caller_batch_size_is_clamped_to_the_engine_profile(tiny_artifact, tiny_checkpoint, expected):
    pairs, scores = expected
    reranker = _open("tensorrt", tiny_artifact, tiny_checkpoint)
    assert np.max(np.abs(reranker.predict(pairs, batch_size=10_000) - scores)) <= 1e-4  # the session asserts the limits
    reranker.close()
    assert reranker.session.closed == 1


def test_the_registry_names_every_runtime_and_loads_the_artifacts_own():
    from ettin_runtime.artifact import DEFAULT_RUNTIME
    from ettin_runtime.loading import RUNTIMES

    assert set(DEFAULT_RUNTIME.values()) <= set(RUNTIMES)
    for target in RUNTIMES.values():
        module, _, name = target.partition(":")
        assert module.startswith("ettin_runtime.backends.") and name.endswith("Reranker")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_packing_budget_is_not_raised_to_the_max_length(tiny_artifact, expected, runtime):
    """A CPU backend packs at its budget whatever the max length (7,999 for the Ettin sizes): a pair
    longer than the budget runs alone, within the artifact's limit."""
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="pip install 'ettin-export[openvino]'")
    pairs, scores = expected
    reranker = Reranker.load(tiny_artifact, runtime=runtime, max_batch_tokens=50)
    assert reranker.max_batch_tokens == 50 < reranker.max_length <= reranker.token_limit
    seen = []
    real = reranker._score
    reranker._score = lambda batch: (seen.append(batch), real(batch))[1]
    got = reranker.predict(pairs)
    assert np.max(np.abs(got - scores)) <= 1e-4
    assert all(len(b.input_ids) <= 50 or b.num_pairs == 1 for b in seen)
    assert any(len(b.input_ids) > 50 for b in seen) and any(b.num_pairs > 1 for b in seen)
    reranker.close()


def test_a_run_that_cannot_hold_one_full_pair_is_refused(tiny_artifact):
    from ettin_runtime.backends.onnxruntime import OnnxRuntimeReranker
    from ettin_runtime.packing import PairEncoder

    artifact = Artifact.open(tiny_artifact)
    encoder = PairEncoder.from_dir(artifact.root, artifact.max_length)
    with pytest.raises(ValueError, match="below max_length"):
        OnnxRuntimeReranker(None, encoder, artifact, max_batch_tokens=50, max_batch_pairs=4, token_limit=100)
