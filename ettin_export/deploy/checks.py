"""What a generated configuration must agree with before it is written: the graph's own inputs, outputs
and types (read from the .onnx file, or the manifest's record of them), and the engine's limits (the
front's packed batches must fit the TensorRT profile: at most its maximum tokens and pairs per run,
and at least one full-length pair).

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
# The serving contract (ettin_runtime.artifact): one packed batch per engine request, as the front sends it.
TOKENS_INPUT = INPUT_IDS
OFFSETS_INPUT = CU_SEQLENS
# The front's own limits, in the reranker model's parameters.
BUDGET_TOKENS, BUDGET_PAIRS = "max_batch_tokens", "max_batch_pairs"


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
# Batch limits: what the front may put in one engine request
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchBudget:
    """The most one engine request holds, as the front cuts batches (`plan_batches`)."""

    max_tokens: int
    max_pairs: int


def engine_limits(artifact: Artifact) -> tuple[BatchBudget, str]:
    """What one run of the engine holds (a TensorRT engine's: its profile's maxima), and its name in messages."""
    limits = artifact.limits
    what = "the profile's" if limits.profile is not None else "the artifact's"
    return BatchBudget(limits.max_batch_tokens, limits.max_batch_pairs), what


def choose_batch_budget(artifact: Artifact, *, pairs: int | None, tokens: int | None, min_pair_tokens: int,
                        default_tokens: int | None = None) -> BatchBudget:
    """The front's budget per engine request: `pairs` / `tokens` when asked, else the engine's limits
    (tokens: `default_tokens` when given, the CPU's best batch size, within the engine's). Refuses what the
    engine cannot run: more than its profile's maxima, a profile that cannot hold one full-length pair, or
    one whose minimum is above a single shortest pair (`min_pair_tokens`: the special tokens of an empty pair),
    which would refuse a request of one short document."""
    profile = artifact.limits.profile
    if profile is not None and (profile.tokens[0] > min_pair_tokens or profile.pairs[0] > 1):
        raise DeployError(
            f"The engine profile's minimum ({profile.tokens[0]} tokens, {profile.pairs[0]} pairs) is above a single "
            f"shortest pair ({min_pair_tokens} tokens): the engine would refuse a request of one short document. "
            "Rebuild the engine with profile minimums of 1 token and 1 pair."
        )
    engine, what = engine_limits(artifact)
    length = artifact.max_length
    if engine.max_tokens < length:
        raise DeployError(
            f"The engine cannot hold even one full-length pair: {what} max_batch_tokens {engine.max_tokens} is below "
            f"max_length {length}. Rebuild it with a larger profile, or a smaller --max-length."
        )
    for value, flag in ((pairs, "--max-batch-size"), (tokens, "--max-batch-tokens")):
        if value is not None and value < 1:
            raise DeployError(f"{flag} must be at least 1, got {value}.")
    if pairs is not None and pairs > engine.max_pairs:
        raise DeployError(
            f"--max-batch-size {pairs} pairs per engine request is more than the engine holds: {what} max_batch_pairs "
            f"is {engine.max_pairs}. Use --max-batch-size {engine.max_pairs} or less, or rebuild the engine with a "
            "larger profile."
        )
    if tokens is not None and tokens > engine.max_tokens:
        raise DeployError(
            f"--max-batch-tokens {tokens} is more than the engine holds: {what} max_batch_tokens is "
            f"{engine.max_tokens}. Use --max-batch-tokens {engine.max_tokens} or less, or rebuild the engine with a "
            "larger profile."
        )
    if tokens is not None and tokens < length:
        raise DeployError(f"--max-batch-tokens {tokens} is below max_length {length}: a full-length pair would not "
                          f"fit in an engine request. Use at least {length}.")
    if tokens is None:
        tokens = engine.max_tokens if default_tokens is None else max(min(default_tokens, engine.max_tokens), length)
    return BatchBudget(int(tokens), int(pairs if pairs is not None else engine.max_pairs))


def check_budget(parameters: dict[str, str], artifact: Artifact) -> list[str]:
    """The front's parameters against the engine's limits: what no engine request may exceed."""
    engine, what = engine_limits(artifact)
    problems = []
    try:
        budget = BatchBudget(int(parameters[BUDGET_TOKENS]), int(parameters[BUDGET_PAIRS]))
    except (KeyError, ValueError):
        return [f"the reranker model's parameters lack integer {BUDGET_TOKENS} / {BUDGET_PAIRS}"]
    if not artifact.max_length <= budget.max_tokens <= engine.max_tokens:
        problems.append(f"the front packs up to {budget.max_tokens} tokens per engine request; the engine takes "
                        f"max_length {artifact.max_length} to {what} max_batch_tokens {engine.max_tokens}")
    if not 1 <= budget.max_pairs <= engine.max_pairs:
        problems.append(f"the front packs up to {budget.max_pairs} pairs per engine request; {what} max_batch_pairs "
                        f"is {engine.max_pairs}")
    return problems


# --------------------------------------------------------------------------------------------------
# Cross-checks of a parsed ModelConfig
# --------------------------------------------------------------------------------------------------


def _dtype(value: int) -> str:
    return model_config_module().DataType.Name(value)


def _dims_fit(dims, shape) -> bool:
    """Config dims (max_batch_size 0: the full shape) against a graph shape: a fixed graph dimension must be
    the same number, a dynamic one (named, or "?") must be -1."""
    return len(dims) == len(shape) and all(d == g if isinstance(g, int) else d == -1 for d, g in zip(dims, shape))


def check_engine_config(config, graph: GraphSignature) -> None:
    """A parsed engine-model ModelConfig against the graph: one packed batch per request, passed through
    unbatched (max_batch_size 0), every graph input fed with its own dtype and rank, the outputs' full
    shapes. (The sizes a request may have are the front's budget, `check_budget`.)"""
    problems: list[str] = []
    where = f"{config.name}/config.pbtxt"

    if config.max_batch_size != 0:
        problems.append(
            f"max_batch_size is {config.max_batch_size}; the engine takes one packed batch per request "
            "(input_ids [T] + cu_seqlens [B+1]), which Triton must not merge: use max_batch_size 0")
    if config.HasField("dynamic_batching"):
        problems.append("dynamic_batching is set; the front batches (and Triton cannot batch with max_batch_size 0)")
    if config.batch_input:
        problems.append("batch_input is set; the front sends cu_seqlens itself")

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
        if tensor.allow_ragged_batch:
            problems.append(f"input {tensor.name}: allow_ragged_batch would concatenate requests; the front packs")
        if not _dims_fit(tensor.dims, spec.shape):
            problems.append(f"input {tensor.name}: dims {list(tensor.dims)} against graph shape {list(spec.shape)}")
    for name in (TOKENS_INPUT, OFFSETS_INPUT):
        if name in graph.inputs and name not in fed:
            problems.append(f"no input {name}: the front sends it with every packed batch")
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
        if not _dims_fit(tensor.dims, spec.shape):
            problems.append(f"output {tensor.name}: dims {list(tensor.dims)} against graph shape {list(spec.shape)}")
    if not config.output:
        problems.append("no outputs")
    if any(group.count < 1 for group in config.instance_group):
        problems.append("instance_group count must be >= 1")
    if problems:
        raise ConfigError(f"{where} does not fit the graph ({graph.source}): " + "; ".join(problems) + ".")
