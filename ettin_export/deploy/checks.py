"""What a generated configuration must agree with before it is written: the graph's own inputs, outputs
and types (read from the .onnx file, or the manifest's record of them), and the engine's limits (the
TensorRT profile must hold `max_batch_size` full-length pairs, because Triton batches by request count,
not by tokens).

Parsing against the ModelConfig schema (schema.py) checks syntax and types only; these are the
project-side checks the schema cannot make.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ettin_runtime.artifact import CU_SEQLENS, INPUT_IDS, Artifact, TensorSpec

from ettin_export.errors import DeployError, MissingDependency

from ettin_export.deploy.schema import ConfigError, model_config_module

# Triton data types and the graph dtypes they carry (the names the manifest uses).
TRITON_DTYPES = {
    "TYPE_BOOL": "bool", "TYPE_INT32": "int32", "TYPE_INT64": "int64", "TYPE_FP16": "float16",
    "TYPE_BF16": "bfloat16", "TYPE_FP32": "float32", "TYPE_FP64": "float64", "TYPE_STRING": "bytes",
}
_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64", 16: "bfloat16"}
# The serving contract (ettin_runtime.artifact): the ragged token input and the offsets Triton derives from it.
RAGGED_INPUT = INPUT_IDS
OFFSETS_INPUT = CU_SEQLENS
OFFSETS_KIND = "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO"


@dataclass(frozen=True)
class GraphSignature:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    source: str  # where it was read: "model.onnx" or "manifest.json"


def signature_from_onnx(path: str | Path) -> GraphSignature:
    """Inputs and outputs of an ONNX file (weights are not loaded)."""
    try:
        import onnx
    except ImportError as error:
        raise MissingDependency("Reading the graph's inputs needs onnx: pip install 'ettin-export[export]'.") from error
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        return TensorSpec(value.name, _ONNX_DTYPES.get(tensor.elem_type, f"onnx-type-{tensor.elem_type}"), dims)

    return GraphSignature(
        {v.name: spec(v) for v in graph.input if v.name not in initializers},
        {v.name: spec(v) for v in graph.output},
        Path(path).name,
    )


def signature_from_artifact(artifact: Artifact) -> GraphSignature:
    return GraphSignature({t.name: t for t in artifact.inputs}, {t.name: t for t in artifact.outputs}, "manifest.json")


def check_signature_matches_artifact(graph: GraphSignature, artifact: Artifact) -> None:
    """The graph file and the manifest's record of it must agree (names, dtypes, ranks)."""
    recorded = signature_from_artifact(artifact)
    problems = []
    for kind, ours, theirs in (("input", graph.inputs, recorded.inputs), ("output", graph.outputs, recorded.outputs)):
        if set(ours) != set(theirs):
            problems.append(f"{kind}s {sorted(ours)} in {graph.source} but {sorted(theirs)} in manifest.json")
            continue
        for name, spec in ours.items():
            if (spec.dtype, len(spec.shape)) != (theirs[name].dtype, len(theirs[name].shape)):
                problems.append(
                    f"{kind} {name}: {spec.dtype} rank {len(spec.shape)} in {graph.source}, "
                    f"{theirs[name].dtype} rank {len(theirs[name].shape)} in manifest.json"
                )
    if problems:
        raise DeployError(
            "The artifact's graph and its manifest disagree: " + "; ".join(problems) + ". Rebuild the artifact."
        )


# --------------------------------------------------------------------------------------------------
# Batch limits
# --------------------------------------------------------------------------------------------------


def batch_limit(artifact: Artifact) -> tuple[int, str]:
    """The most pairs per execution the engine holds when every pair is `max_length` tokens, and why:
    at most max_batch_pairs, and max_batch_tokens // max_length (a TensorRT engine's are its profile's
    maxima, so total_tokens max >= max_batch_size x max_length)."""
    limits, length = artifact.limits, artifact.max_length
    what = "the profile's" if limits.profile is not None else ""
    caps = [
        (limits.max_batch_pairs, f"{what} max_batch_pairs is {limits.max_batch_pairs}".strip()),
        (limits.max_batch_tokens // length,
         f"{what} max_batch_tokens {limits.max_batch_tokens} holds {limits.max_batch_tokens // length} pairs of "
         f"max_length {length}".strip()),
    ]
    return min(caps, key=lambda cap: cap[0])  # ties: the first named explains best


def choose_max_batch_size(artifact: Artifact, requested: int | None, min_pair_tokens: int) -> int:
    """The engine model's `max_batch_size` (pairs per execution): `requested`, or the largest the engine
    holds at full length (`batch_limit`). Refuses what the engine cannot run, including a profile whose
    minimum is above one shortest pair (`min_pair_tokens`: the special tokens of an empty pair)."""
    profile = artifact.limits.profile
    if profile is not None and (profile.tokens[0] > min_pair_tokens or profile.pairs[0] > 1):
        raise DeployError(
            f"The engine profile's minimum ({profile.tokens[0]} tokens, {profile.pairs[0]} pairs) is above a single "
            f"shortest pair ({min_pair_tokens} tokens): Triton would send batches the engine rejects. Rebuild the "
            "engine with profile minimums of 1 token and 1 pair."
        )
    limit, reason = batch_limit(artifact)
    length = artifact.max_length
    if limit < 1:
        raise DeployError(
            f"The engine cannot hold even one full-length pair: {reason}. Rebuild it with a larger profile, or a "
            "smaller --max-length."
        )
    if requested is None:
        return limit
    if requested < 1:
        raise DeployError(f"--max-batch-size must be at least 1, got {requested}.")
    if requested > limit:
        raise DeployError(
            f"--max-batch-size {requested} is more than the engine holds at full length: {reason} "
            f"(Triton batches by request count, so a batch of {requested} pairs may be {requested} x "
            f"{length} tokens). Use --max-batch-size {limit} or less, or rebuild the engine with a larger profile."
        )
    return requested


# --------------------------------------------------------------------------------------------------
# Cross-checks of a parsed ModelConfig
# --------------------------------------------------------------------------------------------------


def _dtype(value: int) -> str:
    return model_config_module().DataType.Name(value)


def check_engine_config(config, graph: GraphSignature, *, artifact: Artifact, builds_offsets: bool) -> None:
    """A parsed engine-model ModelConfig against the graph and the engine's limits.

    `builds_offsets`: the model computes cu_seqlens itself (the python backend gets no batch inputs);
    otherwise a `batch_input` must produce it."""
    module = model_config_module()
    problems: list[str] = []
    where = f"{config.name}/config.pbtxt"

    if config.max_batch_size < 1:
        problems.append("max_batch_size must be >= 1: pairs arrive one per request and are batched by Triton")
    else:
        try:
            largest, reason = batch_limit(artifact)
        except DeployError as error:
            problems.append(str(error))
        else:
            if config.max_batch_size > largest:
                problems.append(
                    f"max_batch_size {config.max_batch_size} full-length pairs of {artifact.max_length} tokens is "
                    f"more than the engine holds ({reason})"
                )
    if not config.HasField("dynamic_batching"):
        problems.append("no dynamic_batching: pairs of different requests would never share an execution")

    fed: set[str] = set()
    for tensor in config.input:
        spec = graph.inputs.get(tensor.name)
        if spec is None:
            problems.append(f"input {tensor.name!r} is not a graph input (the graph has {sorted(graph.inputs)})")
            continue
        fed.add(tensor.name)
        triton_type = _dtype(tensor.data_type)
        if TRITON_DTYPES.get(triton_type) != spec.dtype:
            problems.append(f"input {tensor.name}: {triton_type} but the graph's is {spec.dtype}")
        if tensor.name == RAGGED_INPUT:
            if not tensor.allow_ragged_batch:
                problems.append(f"input {tensor.name} must have allow_ragged_batch: true (pairs differ in length)")
            if list(tensor.dims) != [-1] or len(spec.shape) != 1 or isinstance(spec.shape[0], int):
                problems.append(
                    f"input {tensor.name}: dims {list(tensor.dims)} against graph shape {list(spec.shape)}; a ragged "
                    "input is dims [-1] over a dynamic 1-D graph input (Triton concatenates the requests)"
                )
        elif len(spec.shape) != len(tensor.dims) + 1:
            problems.append(
                f"input {tensor.name}: dims {list(tensor.dims)} + batch do not match graph shape {list(spec.shape)}")
    sources = {t.name for t in config.input}
    for batch_input in config.batch_input:
        kind = module.BatchInput.Kind.Name(batch_input.kind)
        for target in batch_input.target_name:
            spec = graph.inputs.get(target)
            if spec is None:
                problems.append(f"batch_input target {target!r} is not a graph input")
                continue
            fed.add(target)
            triton_type = _dtype(batch_input.data_type)
            if TRITON_DTYPES.get(triton_type) != spec.dtype or len(spec.shape) != 1:
                problems.append(f"batch_input {target}: {triton_type} for graph {spec.dtype} {list(spec.shape)}")
            if target == OFFSETS_INPUT and kind != OFFSETS_KIND:
                problems.append(f"batch_input {target} is {kind}; cu_seqlens is {OFFSETS_KIND} (0, len0, len0+len1, ...)")
        missing_sources = [s for s in batch_input.source_input if s not in sources]
        if missing_sources or not batch_input.source_input:
            problems.append(
                f"batch_input source_input {list(batch_input.source_input)} is not among the inputs {sorted(sources)}")
    if builds_offsets:
        if config.batch_input:
            problems.append("a python-backend engine gets no batch inputs; it builds cu_seqlens itself")
        fed.add(OFFSETS_INPUT)
    elif not any(OFFSETS_INPUT in b.target_name for b in config.batch_input):
        problems.append(f"no batch_input produces {OFFSETS_INPUT}")
    unfed = sorted(set(graph.inputs) - fed)
    if unfed:
        problems.append(f"graph inputs {unfed} are fed by nothing")

    for tensor in config.output:
        spec = graph.outputs.get(tensor.name)
        if spec is None:
            problems.append(f"output {tensor.name!r} is not a graph output (the graph has {sorted(graph.outputs)})")
            continue
        triton_type = _dtype(tensor.data_type)
        if TRITON_DTYPES.get(triton_type) != spec.dtype:
            problems.append(f"output {tensor.name}: {triton_type} but the graph's is {spec.dtype}")
        inner = list(spec.shape[1:])
        if len(inner) != len(tensor.dims) or any(
            isinstance(g, int) and g != d for g, d in zip(inner, tensor.dims)
        ):
            problems.append(
                f"output {tensor.name}: dims {list(tensor.dims)} (after the batch dimension) against graph shape "
                f"{list(spec.shape)}"
            )
    if not config.output:
        problems.append("no outputs")
    if any(group.count < 1 for group in config.instance_group):
        problems.append("instance_group count must be >= 1")
    if problems:
        raise ConfigError(f"{where} does not fit the graph ({graph.source}) or the engine: " + "; ".join(problems) + ".")
