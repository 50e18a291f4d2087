"""The generated Triton model configurations, as data (dicts in ModelConfig's protobuf field names).

Three kinds of model:
- the *reranker* model (python backend, the entry point and the front): query + documents (+ top_n)
  in, scores in document order + top-n indices out. Triton's dynamic batcher hands one execute() the
  requests that queued meanwhile; the front tokenizes all their pairs in one batched call, cuts them
  into packed batches within the engine's limits (`ettin_runtime.packing.plan_batches`, longest first,
  so pairs of different requests share batches) and sends each batch to the engine as ONE request;
- an *engine* model: one packed batch per request, `input_ids` INT32 [T] (the pairs' tokens,
  concatenated, unpadded) and `cu_seqlens` INT32 [B+1] (0, len0, len0+len1, ..., T), one score per pair
  out, `scores` FP32 [B, 1]. `max_batch_size: 0`: Triton passes each request through as it is, so the
  shapes a request may have are the engine's own limits (for a TensorRT plan, the optimization
  profile's, which Triton's TensorRT backend enforces on every request);
- a *null engine* (optional, `--with-null-engine`): the same interface, constant scores, no model. A
  second front (`<name>_null`) calls it, so the front's own cost can be measured on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ettin_export.deploy.checks import OFFSETS_INPUT, TOKENS_INPUT

DEFAULT_NAME = "ettin_reranker"
NULL_SUFFIX = "_null"  # the null front is <name>_null, its engine <name>_null_engine
NULL_ENGINE_SUFFIX = "_null_engine"
# Requests the front takes in one execute(): all their pairs are tokenized and packed together.
RERANKER_MAX_BATCH_REQUESTS = 32
RERANKER_QUEUE_DELAY_US = 200


@dataclass(frozen=True)
class EngineBackend:
    """One way to run the graph inside Triton."""

    key: str  # the --cpu-backend value, or "tensorrt"
    suffix: str  # engine model name = <name><suffix>
    fields: tuple[tuple[str, object], ...]  # backend / platform
    instance_kind: str
    description: str


ENGINE_BACKENDS = {
    b.key: b
    for b in (
        EngineBackend("tensorrt", "_trt", (("platform", "tensorrt_plan"),), "KIND_GPU",
                      "TensorRT plan (tensorrt_plan platform), one packed batch per request"),
        EngineBackend("onnxruntime", "_onnx", (("backend", "onnxruntime"),), "KIND_CPU",
                      "Triton's onnxruntime backend (a Triton container), one packed batch per request"),
        EngineBackend("python", "_ort", (("backend", "python"),), "KIND_CPU",
                      "python backend running the ONNX file with the artifact's runtime (ONNX Runtime or OpenVINO), one packed batch per request"),
    )
}
NULL_ENGINE = EngineBackend("null", NULL_ENGINE_SUFFIX, (("backend", "python"),), "KIND_CPU",
                            "python backend returning constant scores: the front's cost alone")


# What a config.pbtxt of each engine model says about its requests (its header).
PACKED_REQUESTS = (
    "Requests: ONE packed batch each, from the reranker model (the front): input_ids INT32 [T], the pairs' tokens "
    "concatenated with no padding, and cu_seqlens INT32 [B+1] = 0, len0, len0+len1, ..., T. max_batch_size is 0: "
    "Triton does not merge requests (the front already packed pairs of many client requests into each one)."
)
_PROFILE_ENFORCED = (
    "Triton's TensorRT backend refuses a request whose shapes are outside the plan's optimization profile, so no "
    "request can hold more tokens or pairs than the profile; it cannot check the offsets' contents: cu_seqlens must "
    "start at 0, rise, and end at T. The front always sends that; keep this model's endpoint internal (clients call "
    "the reranker model, or the /v1/rerank gateway)."
)
_TRUSTS_OFFSETS = (
    "Triton's onnxruntime backend checks neither the sizes nor the offsets' contents: cu_seqlens must start at 0, "
    "rise, and end at T. The front always sends that; keep this model's endpoint internal."
)
ENGINE_REQUEST_NOTES = {
    "tensorrt": (PACKED_REQUESTS, _PROFILE_ENFORCED),
    "onnxruntime": (PACKED_REQUESTS, _TRUSTS_OFFSETS),
    "python": (PACKED_REQUESTS, "A request beyond the limits in parameters, or with offsets that do not describe "
               "its tokens, gets a 400 that says so."),
    "null": (PACKED_REQUESTS, "Scores are constant (0); for measuring the front only."),
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
    instances: int,
    compute_capability: str | None = None,
    parameters: dict[str, object] | None = None,
) -> dict:
    config: dict = {"name": name, **dict(backend.fields), "max_batch_size": 0}
    config["input"] = [{"name": TOKENS_INPUT, "data_type": "TYPE_INT32", "dims": [-1]},
                       {"name": OFFSETS_INPUT, "data_type": "TYPE_INT32", "dims": [-1]}]
    config["output"] = [{"name": "scores", "data_type": "TYPE_FP32", "dims": [-1, 1]}]
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
