"""The generated Triton model configurations, as data (dicts in ModelConfig's protobuf field names).

Two kinds of model:
- an *engine* model: token ids of one pair per request in, one score per pair out. `input_ids` is
  ragged, so the dynamic batcher concatenates pairs of any length, unpadded, into one execution;
  `cu_seqlens` is derived from the request boundaries (`batch_input` for the TensorRT and ONNX Runtime
  backends; the python backend gets no batch inputs, so its model builds it);
- the *reranker* model (python backend, the entry point): query + documents (+ top_n) in, scores in
  document order + top-n indices out. It tokenizes and fans one request per pair out to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ettin_export.deploy.checks import OFFSETS_INPUT, OFFSETS_KIND, RAGGED_INPUT

DEFAULT_NAME = "ettin_reranker"
# Requests the reranker takes in one execute(): all their pairs are fanned out together.
RERANKER_MAX_BATCH_REQUESTS = 16
RERANKER_QUEUE_DELAY_US = 200


@dataclass(frozen=True)
class EngineBackend:
    """One way to run the graph inside Triton."""

    key: str  # the --cpu-backend value, or "tensorrt"
    suffix: str  # engine model name = <name><suffix>
    fields: tuple[tuple[str, object], ...]  # backend / platform
    instance_kind: str
    offsets_from_batch_input: bool  # else the model builds cu_seqlens itself
    description: str


ENGINE_BACKENDS = {
    b.key: b
    for b in (
        EngineBackend("tensorrt", "_trt", (("platform", "tensorrt_plan"),), "KIND_GPU", True,
                      "TensorRT plan (tensorrt_plan platform), ragged input_ids, cu_seqlens from a batch input"),
        EngineBackend("onnxruntime", "_onnx", (("backend", "onnxruntime"),), "KIND_CPU", True,
                      "Triton's onnxruntime backend (a Triton container), ragged input_ids, cu_seqlens from a batch input"),
        EngineBackend("python", "_ort", (("backend", "python"),), "KIND_CPU", False,
                      "python backend running the ONNX file with ONNX Runtime; builds cu_seqlens itself"),
    )
}


# What a config.pbtxt of each engine model says about its requests (its header). Triton's ModelConfig
# cannot limit the batch size of one request, so the configs cannot refuse [k, L] themselves.
ONE_PAIR_PER_REQUEST = (
    "Requests: exactly ONE (query, document) pair each, input_ids INT32 [1, L] (L <= max_length); the dynamic "
    "batcher concatenates the requests of an execution, unpadded, and cu_seqlens marks where each begins."
)
_CANNOT_REFUSE = (
    "This backend cannot refuse a request of [k, L] (k padded pairs): it concatenates ragged inputs by element "
    "count, so it would take the k x L tokens for ONE pair and hand back scores for k. Send [1, L] only; the "
    "reranker model always does."
)
ENGINE_REQUEST_NOTES = {
    "tensorrt": (ONE_PAIR_PER_REQUEST, _CANNOT_REFUSE),
    "onnxruntime": (ONE_PAIR_PER_REQUEST, _CANNOT_REFUSE),
    "python": (ONE_PAIR_PER_REQUEST, "A request of any other shape gets a 400 that says so."),
}


def plan_filename(compute_capability: str) -> str:
    """`model.sm90.plan` for "9.0": a plan only runs on the compute capability it was built for."""
    major, _, minor = str(compute_capability).partition(".")
    return f"model.sm{major}{minor or '0'}.plan"


def _parameters(values: dict[str, object]) -> dict:
    return {key: {"string_value": str(value)} for key, value in values.items()}


def engine_config(
    backend: EngineBackend,
    name: str,
    *,
    max_batch_size: int,
    instances: int,
    queue_delay_us: int,
    compute_capability: str | None = None,
    parameters: dict[str, object] | None = None,
) -> dict:
    config: dict = {"name": name, **dict(backend.fields), "max_batch_size": max_batch_size}
    config["input"] = [{"name": RAGGED_INPUT, "data_type": "TYPE_INT32", "dims": [-1], "allow_ragged_batch": True}]
    if backend.offsets_from_batch_input:
        config["batch_input"] = [{
            "kind": OFFSETS_KIND, "target_name": [OFFSETS_INPUT], "data_type": "TYPE_INT32",
            "source_input": [RAGGED_INPUT],
        }]
    config["output"] = [{"name": "scores", "data_type": "TYPE_FP32", "dims": [1]}]
    config["dynamic_batching"] = {"max_queue_delay_microseconds": int(queue_delay_us)}
    config["instance_group"] = [{"kind": backend.instance_kind, "count": int(instances)}]
    if backend.key == "tensorrt":
        config["cc_model_filenames"] = {str(compute_capability): plan_filename(compute_capability)}
    if backend.key == "onnxruntime":
        config["default_model_filename"] = "model.onnx"
    if parameters:
        config["parameters"] = _parameters(parameters)
    return config


def reranker_config(name: str, *, instances: int, parameters: dict[str, object]) -> dict:
    """Request: query [1], documents [-1] (ragged, so requests with different document counts share an
    execute()), optional top_n [1]; with max_batch_size > 0 each carries a leading batch dimension
    (normally 1). Response: scores FP32 [-1] in document order, top_indices INT32 [-1]."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": RERANKER_MAX_BATCH_REQUESTS,
        "input": [
            {"name": "query", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "documents", "data_type": "TYPE_STRING", "dims": [-1], "allow_ragged_batch": True},
            {"name": "top_n", "data_type": "TYPE_INT32", "dims": [1], "optional": True},
        ],
        "output": [
            {"name": "scores", "data_type": "TYPE_FP32", "dims": [-1]},
            {"name": "top_indices", "data_type": "TYPE_INT32", "dims": [-1]},
        ],
        "dynamic_batching": {"max_queue_delay_microseconds": RERANKER_QUEUE_DELAY_US},
        "instance_group": [{"kind": "KIND_CPU", "count": int(instances)}],
        "parameters": _parameters(parameters),
    }
