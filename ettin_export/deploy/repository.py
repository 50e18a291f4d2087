"""Write a self-contained Triton model repository for an artifact.

    REPO/
      ettin-deploy.json                what was generated, from which artifact (and marks REPO as ours)
      <name>/                          python backend: the entry point and front (query + documents -> scores)
        config.pbtxt
        1/model.py                     ettin_export/deploy/models/reranker.py
        1/ettin_packing.py             ettin_runtime/packing.py (CrossEncoder-exact tokenization)
        1/tokenizer/                   the artifact's tokenizer files
      <name>_trt/                      TensorRT artifact: tensorrt_plan, 1/model.sm90.plan
      <name>_ort/                      CPU artifact, --cpu-backend python (default): 1/model.py + model.onnx
      <name>_onnx/                     CPU artifact, --cpu-backend onnxruntime: 1/model.onnx
      <name>_null/, <name>_null_engine/   --with-null-engine: the same front against constant scores

A CPU repository holds one engine model, so that every model in it loads under the server it is made
for: `python` runs on any Triton (and on the CPU-only PyPI server the tests use); `onnxruntime` needs
Triton's onnxruntime backend (the NGC container).

Everything is assembled in a staging folder beside REPO, every config.pbtxt is parsed back from disk
and cross-checked, and only then is the staging folder moved into place.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ettin_runtime.artifact import TOKENIZER_FILES, Artifact

from ettin_export.deploy.checks import (
    BUDGET_PAIRS,
    BUDGET_TOKENS,
    BatchBudget,
    DeployError,
    check_budget,
    check_engine_config,
    check_signature_matches_artifact,
    choose_batch_budget,
    signature_from_artifact,
    signature_from_onnx,
)
from ettin_export.deploy.configs import (
    DEFAULT_NAME,
    ENGINE_BACKENDS,
    ENGINE_REQUEST_NOTES,
    NULL_ENGINE,
    NULL_SUFFIX,
    RERANKER_QUEUE_DELAY_US,
    EngineBackend,
    engine_config,
    reranker_config,
)
from ettin_export.deploy.engines import ENGINE_LAYOUTS, FRONT_REQUIREMENTS
from ettin_export.deploy.schema import ConfigError, config_to_text, parse_config
from ettin_export.staging import StagedFolder, replacement_problem, unwritable_problem

MARKER_NAME = "ettin-deploy.json"
TOKENIZER_DIR = "tokenizer"
PACKING_MODULE = "ettin_packing.py"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class DeployOptions:
    repo: Path
    name: str = DEFAULT_NAME
    instances: int = 1  # engine model instances (GPU: per GPU)
    reranker_instances: int = 2  # python front processes: one tokenizes while another waits for the engine
    max_batch_size: int | None = None  # pairs per engine request; default: what the engine holds
    max_batch_tokens: int | None = None  # tokens per engine request; default: the engine's (CPU: its best size)
    queue_delay_us: int = RERANKER_QUEUE_DELAY_US  # how long the front's batcher waits to gather requests
    cpu_backend: str = "python"  # "python" | "onnxruntime" (CPU artifacts)
    max_documents: int = 1000  # per reranker request
    null_engine: bool = False  # also <name>_null: the same front against constant scores
    allow_random_weights: bool = False
    force: bool = False


@dataclass
class DeployedRepository:
    path: Path
    reranker_model: str
    engine_model: str
    engine_backend: str
    budget: BatchBudget  # the most the front puts in one engine request
    null_reranker_model: str | None = None  # --with-null-engine: the front against constant scores
    configs: dict[str, str] = field(default_factory=dict)  # model name -> config.pbtxt text
    python_requirements: list[str] = field(default_factory=list)  # for the python models, in the server's Python
    tensorrt_version: str | None = None  # the server's TensorRT must be this one
    server_args: list[str] = field(default_factory=list)  # tritonserver flags the repository wants
    serving_notes: list[str] = field(default_factory=list)  # which container and driver the plan needs
    warnings: list[str] = field(default_factory=list)  # known faults of the plan's TensorRT release


def _engine_backend(artifact: Artifact, options: DeployOptions) -> EngineBackend:
    if not artifact.engine.complete:
        raise DeployError(
            "This artifact is unfinished (the ONNX export of a TensorRT build, made with --onnx-only): finish it on "
            f"the GPU host first: {artifact.engine.finish_command or 'ettin-export build ... --target h100'}"
        )
    if artifact.engine.format == "tensorrt":
        return ENGINE_BACKENDS["tensorrt"]
    if options.cpu_backend not in ("python", "onnxruntime"):
        raise DeployError(f"--cpu-backend must be 'python' or 'onnxruntime', got {options.cpu_backend!r}.")
    if options.cpu_backend == "onnxruntime" and artifact.engine.runtime != "onnxruntime":
        raise DeployError(
            f"This {artifact.precision} artifact runs on {artifact.engine.runtime}; Triton's onnxruntime backend runs "
            "ONNX Runtime artifacts only (and Triton's openvino backend cannot read the attention's local function). "
            "Deploy it with --cpu-backend python, which runs the artifact's own runtime."
        )
    return ENGINE_BACKENDS[options.cpu_backend]


def _graph_signature(artifact: Artifact):
    """From the ONNX file when the artifact has one (a TensorRT artifact may keep its bf16 ONNX beside
    the plan), checked against the manifest's record; else the manifest's record alone."""
    engine = artifact.engine
    candidates = [engine.file] if engine.format == "onnx" else [engine.record.get("onnx_file"), "model.onnx"]
    for name in candidates:
        if name and artifact.path(name).is_file():
            graph = signature_from_onnx(artifact.path(name))
            check_signature_matches_artifact(graph, artifact)
            return graph
    if engine.format == "onnx":
        raise DeployError(f"{artifact.root} has no {engine.file}; the artifact is incomplete. Rebuild it.")
    return signature_from_artifact(artifact)


def _min_pair_tokens(artifact: Artifact) -> int:
    from ettin_runtime.packing import PairEncoder

    return len(PairEncoder.from_dir(artifact.root, artifact.max_length).encode([("", "")])[0])


def _cpu_tokens(artifact: Artifact, backend: EngineBackend) -> int | None:
    """On the CPU, the batch size ONNX Runtime runs fastest (what the in-process runtime packs by default)."""
    if backend.instance_kind != "KIND_CPU":
        return None
    from ettin_runtime.backends.onnxruntime import cpu_batch_tokens

    return cpu_batch_tokens(artifact.model.hidden_size, artifact.max_length, artifact.precision)


def _prepare_repo(repo: Path, force: bool) -> None:
    problem = unwritable_problem(repo, "--repo") or replacement_problem(repo, force=force, ours=lambda path: (path / MARKER_NAME).is_file(),
                                  option="--repo", foreign="`ettin-export deploy` did not write",
                                  holds="a generated repository")
    if problem:
        raise DeployError(problem)


def _place(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)


def _model_source(name: str) -> str:
    return importlib.resources.files("ettin_export.deploy.models").joinpath(name).read_text(encoding="utf-8")


def _header(artifact: Artifact, what: str, notes=()) -> str:
    import textwrap

    from ettin_export import __version__

    source = artifact.source.model or "?"
    random = " (RANDOM WEIGHTS)" if artifact.random_weights else ""
    lines = [f"# {line}" for note in notes for line in textwrap.wrap(note, 104)]
    return (
        f"# {what}\n"
        + "".join(f"{line}\n" for line in lines)
        + f"# Generated by ettin-export {__version__} `deploy triton` from {source}{random}, target {artifact.target}, "
        f"{artifact.precision}, max_length {artifact.max_length}.\n"
        "# Checked against Triton's ModelConfig schema and the graph; regenerate rather than edit.\n"
    )


def deploy_triton(artifact_dir: str | Path, options: DeployOptions) -> DeployedRepository:
    """Generate, check and publish the repository. Raises DeployError (nothing written) when refused."""
    artifact = Artifact.open(artifact_dir)
    if artifact.random_weights and not options.allow_random_weights:
        raise DeployError(
            f"{artifact.root} holds RANDOM weights ({artifact.source.model}): its scores mean nothing. Deploy a "
            "real checkpoint's artifact, or pass --allow-random-weights for a smoke test."
        )
    if not _NAME_PATTERN.match(options.name):
        raise DeployError(f"--name {options.name!r}: use letters, digits, '_', '-' and '.' (a folder name).")
    if options.instances < 1 or options.reranker_instances < 1:
        raise DeployError("--instances and --reranker-instances must be at least 1.")
    if options.queue_delay_us < 0 or options.max_documents < 1:
        raise DeployError("--queue-delay-us must be >= 0 and --max-documents >= 1.")
    backend = _engine_backend(artifact, options)
    graph = _graph_signature(artifact)
    budget = choose_batch_budget(artifact, pairs=options.max_batch_size, tokens=options.max_batch_tokens,
                                 min_pair_tokens=_min_pair_tokens(artifact), default_tokens=_cpu_tokens(artifact, backend))
    repo = Path(options.repo)
    _prepare_repo(repo, options.force)
    staging = StagedFolder(repo, "deploying")
    try:
        result = _write(staging.path, artifact, backend, graph, budget, options)
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    result.path = repo
    return result


def _write(staging: Path, artifact: Artifact, backend: EngineBackend, graph, budget: BatchBudget,
           options: DeployOptions) -> DeployedRepository:
    name = options.name
    engine_name = name + backend.suffix
    engine_dir = staging / engine_name / "1"
    layout = ENGINE_LAYOUTS[backend.key](artifact)
    files = {f"{engine_name}/1/{file}": source for file, source in layout.files.items()}  # repository <- artifact
    configs = {engine_name: config_to_text(
        engine_config(backend, engine_name, instances=options.instances,
                      compute_capability=layout.compute_capability, parameters=layout.parameters),
        _header(artifact, f"Engine model: {backend.description}.", ENGINE_REQUEST_NOTES[backend.key] + layout.serving_notes),
    )}

    tokenizer_files = [f for f in TOKENIZER_FILES if artifact.path(f).is_file()]
    if "tokenizer.json" not in tokenizer_files:
        raise DeployError(f"{artifact.root} has no tokenizer.json; the reranker model tokenizes with it. Rebuild the artifact.")
    fronts = {name: engine_name}
    null_name = None
    if options.null_engine:
        null_name = name + NULL_SUFFIX
        null_engine_name = name + NULL_ENGINE.suffix
        fronts[null_name] = null_engine_name
        configs[null_engine_name] = config_to_text(
            engine_config(NULL_ENGINE, null_engine_name, instances=1),
            _header(artifact, f"Null engine model: {NULL_ENGINE.description}.", ENGINE_REQUEST_NOTES["null"]),
        )
    for front, front_engine in fronts.items():
        for file in tokenizer_files:
            files[f"{front}/1/{TOKENIZER_DIR}/{file}"] = file
        front_parameters = {
            "engine_model": front_engine,
            "max_length": artifact.max_length,
            "tokenizer_dir": TOKENIZER_DIR,
            "max_documents": options.max_documents,
            BUDGET_TOKENS: budget.max_tokens,
            BUDGET_PAIRS: budget.max_pairs,
            "tokenizer_parallelism": "false",
            "score_activation": artifact.score_activation,
            "source_model": artifact.source.model or "",
            "random_weights": str(artifact.random_weights).lower(),
        }
        config = reranker_config(front, instances=options.reranker_instances, parameters=front_parameters)
        config["dynamic_batching"]["max_queue_delay_microseconds"] = int(options.queue_delay_us)
        what = "constant scores (the front's cost alone)" if front == null_name else "scores"
        configs[front] = config_to_text(
            config, _header(artifact, f"Reranker model (entry point, the front): query + documents -> {what}, via "
                            f"{front_engine}, in packed batches of at most {budget.max_tokens} tokens and "
                            f"{budget.max_pairs} pairs."))

    for destination, source in files.items():
        _place(artifact.path(source), staging / destination)
    if layout.model_source:
        (engine_dir / "model.py").write_text(_model_source(layout.model_source), encoding="utf-8")
    if null_name:
        null_dir = staging / (name + NULL_ENGINE.suffix) / "1"
        null_dir.mkdir(parents=True, exist_ok=True)
        (null_dir / "model.py").write_text(_model_source("null_engine.py"), encoding="utf-8")
    from ettin_runtime import packing

    for front in fronts:
        reranker_dir = staging / front / "1"
        (reranker_dir / "model.py").write_text(_model_source("reranker.py"), encoding="utf-8")
        _place(Path(packing.__file__), reranker_dir / PACKING_MODULE)
    for model, text in configs.items():
        (staging / model / "config.pbtxt").write_text(text, encoding="utf-8")

    for front, front_engine in fronts.items():
        check_repository(staging, artifact, graph if front == name else None, front_engine, front)
    requirements = [*FRONT_REQUIREMENTS, *layout.requirements]
    server_args: list[str] = []
    marker = {
        "generated_by": "ettin-export deploy triton",
        "artifact": str(artifact.root.resolve()),
        "source": artifact.source.to_json(),
        "target": artifact.target,
        "precision": artifact.precision,
        "max_length": artifact.max_length,
        "reranker_model": name,
        "engine_model": engine_name,
        "engine_backend": backend.key,
        "null_reranker_model": null_name,
        BUDGET_TOKENS: budget.max_tokens,
        BUDGET_PAIRS: budget.max_pairs,
        "python_requirements": requirements,
        "tensorrt_version": layout.tensorrt_version,
        "server_args": server_args,
        "serving_notes": list(layout.serving_notes),
        "warnings": list(layout.warnings),
        "files": {dest: artifact.files[src] for dest, src in files.items() if src in artifact.files},
    }
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return DeployedRepository(staging, name, engine_name, backend.key, budget, null_name, configs, requirements,
                              layout.tensorrt_version, server_args, list(layout.serving_notes), list(layout.warnings))


def check_repository(root: Path, artifact: Artifact, graph, engine_name: str, reranker_name: str) -> None:
    """Parse every config.pbtxt back from disk against the schema and cross-check it; check that the
    files each model loads are inside the repository. `graph`: the engine's graph signature (None for the
    null engine, which has no graph: it is checked against the real one's interface by its own config)."""
    engine = parse_config((root / engine_name / "config.pbtxt").read_text(), f"{engine_name}/config.pbtxt")
    reranker = parse_config((root / reranker_name / "config.pbtxt").read_text(), f"{reranker_name}/config.pbtxt")
    problems = []
    for config, folder in ((engine, engine_name), (reranker, reranker_name)):
        if config.name != folder:
            problems.append(f"{folder}/config.pbtxt names the model {config.name!r}; Triton requires the folder name")
    check_engine_config(engine, graph or signature_from_artifact(artifact))
    version = root / engine_name / "1"
    if engine.platform == "tensorrt_plan":
        capability = artifact.engine.tensorrt.compute_capability
        if list(engine.cc_model_filenames) != [str(capability)]:
            problems.append(f"cc_model_filenames {dict(engine.cc_model_filenames)} does not map the plan's compute "
                            f"capability {capability}")
        needed = list(engine.cc_model_filenames.values())
    elif engine.backend == "python":
        needed = ["model.py"] + ([engine.parameters["onnx_file"].string_value] if graph is not None else [])
    else:
        needed = [engine.default_model_filename or "model.onnx"]
    if graph is not None and artifact.engine.external_data and engine.platform != "tensorrt_plan":
        needed.append(artifact.engine.external_data)
    parameters = {k: v.string_value for k, v in reranker.parameters.items()}
    if parameters.get("engine_model") != engine_name:
        problems.append(f"the reranker calls {parameters.get('engine_model')!r}, not the engine model {engine_name!r}")
    if int(parameters.get("max_length", -1)) != artifact.max_length:
        problems.append(f"the reranker truncates to {parameters.get('max_length')} tokens, the engine is built for "
                        f"{artifact.max_length}")
    problems += check_budget(parameters, artifact)
    missing = [str((version / n).relative_to(root)) for n in needed if not (version / n).is_file()]
    reranker_version = root / reranker_name / "1"
    for n in ("model.py", PACKING_MODULE, f"{parameters.get('tokenizer_dir')}/tokenizer.json"):
        if not (reranker_version / n).is_file():
            missing.append(str((reranker_version / n).relative_to(root)))
    if missing:
        problems.append(f"files the models load are missing from the repository: {missing}")
    if problems:
        raise ConfigError("The generated repository is inconsistent: " + "; ".join(problems) + ".")
