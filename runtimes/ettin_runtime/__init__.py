"""ettin_runtime: thin runtime wrappers for exported Ettin rerankers (numpy + tokenizers, no torch).

    from ettin_runtime import Reranker
    reranker = Reranker.load("artifacts/17m-cpu")   # the runtime its manifest names
    reranker.predict([("query", "document")])       # float32 raw scores, input order
    reranker.rank("query", ["doc a", "doc b"], top_k=1)

    artifact.py     the artifact folder: Artifact.open (reads and verifies it), artifact.load()
    manifest.py     the manifest's parts as typed data (source, model facts, engine, limits, parity summary)
    loading.py      opening an artifact with a runtime: the RUNTIMES registry, LoadOptions, runtime="auto"
    reranker.py     the contract: Reranker (predict / rank / close) and PackedBatchReranker (local runtimes)
    packing.py      CrossEncoder-exact tokenization and unpadded packing
    checks.py       shared value checks (whole_number)
    machine.py      the CPU a gate ran on and its kernel class
    backends/       one file per local runtime (ONNX Runtime, OpenVINO, TensorRT)
    triton_client.py  TritonReranker: the same contract against a Triton Inference Server
    errors.py       the one error root
"""

from .artifact import Artifact
from .errors import ArtifactError, EttinError, MissingDependency, RuntimeRefused
from .loading import LoadOptions
from .packing import PackedBatch, PairEncoder, PairInputError, pack, packed_batches, plan_batches
from .reranker import PackedBatchReranker, Reranker, apply_activation

__all__ = [
    "Artifact",
    "ArtifactError",
    "EttinError",
    "LoadOptions",
    "MissingDependency",
    "OnnxRuntimeReranker",
    "OpenVinoReranker",
    "PackedBatch",
    "PackedBatchReranker",
    "PairEncoder",
    "PairInputError",
    "Reranker",
    "RuntimeRefused",
    "TensorRTReranker",
    "TritonReranker",
    "apply_activation",
    "pack",
    "packed_batches",
    "plan_batches",
]
__version__ = "0.1.0"

_LAZY = {
    "OnnxRuntimeReranker": "backends.onnxruntime",
    "OpenVinoReranker": "backends.openvino",
    "TensorRTReranker": "backends.tensorrt",
    "TritonReranker": "triton_client",
}


def __getattr__(name):
    """Runtimes import their own library (onnxruntime, tensorrt, tritonclient) only when asked for."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
