"""Write a self-contained Triton model repository for an artifact.

    REPO/
      ettin-deploy.json                what was generated, from which artifact (and marks REPO as ours)
      <name>/                          python backend: the entry point (query + documents -> scores)
        config.pbtxt
        1/model.py                     ettin_export/deploy/models/reranker.py
        1/ettin_packing.py             ettin_runtime/packing.py (CrossEncoder-exact tokenization)
        1/tokenizer/                   the artifact's tokenizer files
      <name>_trt/                      TensorRT artifact: tensorrt_plan, 1/model.sm90.plan
      <name>_ort/                      CPU artifact, --cpu-backend python (default): 1/model.py + model.onnx
      <name>_onnx/                     CPU artifact, --cpu-backend onnxruntime: 1/model.onnx

A CPU repository holds one engine model, so that every model in it loads under the server it is made
for: `python` runs on any Triton (and on the CPU-only PyPI server the tests use); `onnxruntime` needs
Triton's onnxruntime backend (the NGC container).

Everything is assembled in a staging folder beside REPO, every config.pbtxt is parsed back from disk
and cross-checked, and only then is the staging folder moved into place.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ettin_runtime.manifest import Manifest, read_manifest

from .checks import (
    DeployError,
    check_engine_config,
    check_signature_matches_manifest,
    choose_max_batch_size,
    signature_from_manifest,
    signature_from_onnx,
)
from .configs import (
    DEFAULT_NAME,
    ENGINE_BACKENDS,
    ENGINE_REQUEST_NOTES,
    EngineBackend,
    engine_config,
    plan_filename,
    reranker_config,
)
from .schema import ConfigError, config_to_text, parse_config

MARKER_NAME = "ettin-deploy.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_DIR = "tokenizer"
PACKING_MODULE = "ettin_packing.py"
MAX_INFLIGHT_PAIRS = 256
# What the python models import besides numpy (the Triton container's Python has neither).
PYTHON_REQUIREMENTS = {"reranker": ["tokenizers>=0.20,<1"], "python": ["onnxruntime>=1.17"]}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class DeployOptions:
    repo: Path
    name: str = DEFAULT_NAME
    instances: int = 1  # engine model instances (GPU: per GPU)
    reranker_instances: int = 2  # python reranker processes: tokenizing overlaps engine work
    max_batch_size: int | None = None  # pairs per engine execution; default: what the engine holds
    queue_delay_us: int = 1000  # the engine's dynamic-batching window
    cpu_backend: str = "python"  # "python" | "onnxruntime" (CPU artifacts)
    max_documents: int = 1000  # per reranker request
    allow_random_weights: bool = False
    force: bool = False


@dataclass
class DeployedRepository:
    path: Path
    reranker_model: str
    engine_model: str
    engine_backend: str
    max_batch_size: int
    configs: dict[str, str] = field(default_factory=dict)  # model name -> config.pbtxt text
    python_requirements: list[str] = field(default_factory=list)  # for the python models, in the server's Python
    tensorrt_version: str | None = None  # the server's TensorRT must be this one
    server_args: list[str] = field(default_factory=list)  # tritonserver flags the repository wants
    serving_notes: list[str] = field(default_factory=list)  # which container and driver the plan needs
    warnings: list[str] = field(default_factory=list)  # known faults of the plan's TensorRT release


def _engine_backend(manifest: Manifest, options: DeployOptions) -> EngineBackend:
    if manifest.engine.get("complete") is False:
        raise DeployError(
            "This artifact is unfinished (the ONNX export of a TensorRT build, made with --onnx-only): finish it on "
            f"the GPU host first: {manifest.engine.get('finish_command') or 'ettin-export build ... --target h100'}"
        )
    engine_format = manifest.engine.get("format")
    if engine_format == "tensorrt":
        return ENGINE_BACKENDS["tensorrt"]
    if engine_format == "onnx":
        if options.cpu_backend not in ("python", "onnxruntime"):
            raise DeployError(f"--cpu-backend must be 'python' or 'onnxruntime', got {options.cpu_backend!r}.")
        if manifest.precision != "fp32":
            raise DeployError(
                f"This ONNX artifact is {manifest.precision} (target {manifest.target}); ONNX Runtime on the CPU "
                "runs the fp32 graph. Deploy the TensorRT artifact built from it, or build `--target cpu`."
            )
        return ENGINE_BACKENDS[options.cpu_backend]
    raise DeployError(f"Unknown engine format {engine_format!r} in the artifact's manifest.json.")


def _graph_signature(artifact: Path, manifest: Manifest):
    """From the ONNX file when the artifact has one (a TensorRT artifact may keep its bf16 ONNX beside
    the plan), checked against the manifest's record; else the manifest's record alone."""
    engine = manifest.engine
    candidates = [engine.get("file")] if engine.get("format") == "onnx" else [engine.get("onnx_file"), "model.onnx"]
    for name in candidates:
        if name and (artifact / name).is_file():
            graph = signature_from_onnx(artifact / name)
            check_signature_matches_manifest(graph, manifest)
            return graph
    if engine.get("format") == "onnx":
        raise DeployError(f"{artifact} has no {engine.get('file')}; the artifact is incomplete. Rebuild it.")
    return signature_from_manifest(manifest)


def _min_pair_tokens(artifact: Path, manifest: Manifest) -> int:
    from ettin_runtime.packing import PairEncoder

    return len(PairEncoder.from_dir(artifact, manifest.max_length).encode([("", "")])[0])


def _prepare_repo(repo: Path, force: bool) -> None:
    if not repo.exists():
        return
    if not repo.is_dir():
        raise DeployError(f"--repo {repo} exists and is not a folder.")
    if not any(repo.iterdir()):
        return
    if not (repo / MARKER_NAME).is_file():
        raise DeployError(
            f"--repo {repo} is a non-empty folder that `ettin-export deploy` did not write; choose another "
            "--repo (ettin-export never deletes folders it did not write)."
        )
    if not force:
        raise DeployError(f"--repo {repo} already holds a generated repository. Pass --force to replace it.")


def _place(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)


def _model_source(name: str) -> str:
    return importlib.resources.files("ettin_export.deploy.models").joinpath(name).read_text(encoding="utf-8")


def _header(manifest: Manifest, what: str, notes=()) -> str:
    import textwrap

    from .. import __version__

    source = manifest.source.get("model", "?")
    random = " (RANDOM WEIGHTS)" if manifest.random_weights else ""
    lines = [f"# {line}" for note in notes for line in textwrap.wrap(note, 104)]
    return (
        f"# {what}\n"
        + "".join(f"{line}\n" for line in lines)
        + f"# Generated by ettin-export {__version__} `deploy triton` from {source}{random}, target {manifest.target}, "
        f"{manifest.precision}, max_length {manifest.max_length}.\n"
        "# Checked against Triton's ModelConfig schema and the graph; regenerate rather than edit.\n"
    )


def tensorrt_serving_notes(engine: dict) -> tuple[list[str], list[str]]:
    """(what the server needs, known faults of its TensorRT) for a TensorRT artifact's engine facts."""
    from ettin_runtime.tensorrt_backend import cuda_version_text, driver_needed_for_ptx, tensorrt_version_warnings

    version = engine.get("tensorrt_version")
    notes = [
        f"The plan loads only in TensorRT {version}, the release that built it: serve it in the Triton container "
        f"(nvcr.io/nvidia/tritonserver:<yy.mm>-py3) whose release notes list TensorRT {version}, i.e. the same "
        "<yy.mm> as the TensorRT or PyTorch container it was built in (check libnvinfer.so.* in both), or rebuild "
        "the artifact inside the serving release.",
    ]
    needed = driver_needed_for_ptx(engine.get("ptx_version"))
    if needed:
        notes.append(
            f"Its attention kernels are PTX ISA {engine['ptx_version']} for {engine.get('ptx_target') or 'the GPU'}, "
            f"which the server's NVIDIA driver JIT-compiles: it must support CUDA {cuda_version_text(needed)} or newer "
            f"(the build machine's: {engine.get('driver_version') or '?'}, "
            f"CUDA {engine.get('cuda_driver_version') or '?'})."
        )
    return notes, tensorrt_version_warnings(version)


def deploy_triton(artifact_dir: str | Path, options: DeployOptions) -> DeployedRepository:
    """Generate, check and publish the repository. Raises DeployError (nothing written) when refused."""
    artifact = Path(artifact_dir)
    manifest = read_manifest(artifact)
    if manifest.random_weights and not options.allow_random_weights:
        raise DeployError(
            f"{artifact} holds RANDOM weights ({manifest.source.get('model')}): its scores mean nothing. Deploy a "
            "real checkpoint's artifact, or pass --allow-random-weights for a smoke test."
        )
    if not _NAME_PATTERN.match(options.name):
        raise DeployError(f"--name {options.name!r}: use letters, digits, '_', '-' and '.' (a folder name).")
    if options.instances < 1 or options.reranker_instances < 1:
        raise DeployError("--instances and --reranker-instances must be at least 1.")
    if options.queue_delay_us < 0 or options.max_documents < 1:
        raise DeployError("--queue-delay-us must be >= 0 and --max-documents >= 1.")
    backend = _engine_backend(manifest, options)
    graph = _graph_signature(artifact, manifest)
    max_batch_size = choose_max_batch_size(manifest, options.max_batch_size, _min_pair_tokens(artifact, manifest))
    repo = Path(options.repo)
    _prepare_repo(repo, options.force)

    staging = repo.parent / f".{repo.name}.deploying-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        result = _write(staging, artifact, manifest, backend, graph, max_batch_size, options)
        _publish(staging, repo)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.path = repo
    return result


def _write(staging: Path, artifact: Path, manifest: Manifest, backend: EngineBackend, graph, max_batch_size: int,
           options: DeployOptions) -> DeployedRepository:
    name = options.name
    engine_name = name + backend.suffix
    engine_dir = staging / engine_name / "1"
    engine = manifest.engine
    files: dict[str, str] = {}  # repository path -> artifact path

    serving_notes, warnings = tensorrt_serving_notes(engine) if backend.key == "tensorrt" else ([], [])
    if backend.key == "tensorrt":
        compute_capability = engine.get("compute_capability")
        if not compute_capability or not re.fullmatch(r"\d+\.\d+", str(compute_capability)):
            raise DeployError(
                f"The TensorRT artifact records compute_capability {compute_capability!r}; a plan runs only on the "
                "GPU generation it was built for, so the repository maps it by that (e.g. \"9.0\"). Rebuild it."
            )
        plan = artifact / engine["file"]
        if not plan.is_file():
            raise DeployError(f"{artifact} has no {engine['file']} (the TensorRT plan).")
        files[f"{engine_name}/1/{plan_filename(compute_capability)}"] = engine["file"]
        parameters = None
    else:
        compute_capability = None
        files[f"{engine_name}/1/model.onnx"] = engine["file"]
        if engine.get("external_data"):
            files[f"{engine_name}/1/{engine['external_data']}"] = engine["external_data"]
        parameters = None
        if backend.key == "python":
            parameters = {"onnx_file": "model.onnx", "max_length": manifest.max_length,
                          "vocab_size": manifest.model.get("vocab_size", 2**31 - 1), "intra_op_threads": 0}
    engine_text = config_to_text(
        engine_config(backend, engine_name, max_batch_size=max_batch_size, instances=options.instances,
                      queue_delay_us=options.queue_delay_us, compute_capability=compute_capability,
                      parameters=parameters),
        _header(manifest, f"Engine model: {backend.description}.", ENGINE_REQUEST_NOTES[backend.key]
                + (tuple(serving_notes) if backend.key == "tensorrt" else ())),
    )

    tokenizer_files = [f for f in TOKENIZER_FILES if (artifact / f).is_file()]
    if "tokenizer.json" not in tokenizer_files:
        raise DeployError(f"{artifact} has no tokenizer.json; the reranker model tokenizes with it. Rebuild the artifact.")
    for file in tokenizer_files:
        files[f"{name}/1/{TOKENIZER_DIR}/{file}"] = file
    # Pairs one reranker instance keeps in flight: a full batch for every engine instance. Each is a BLS
    # call holding a thread of the python backend's pool (`thread-pool-size`, 32 per instance by default).
    max_inflight = min(MAX_INFLIGHT_PAIRS, max(32, max_batch_size * options.instances))
    reranker_parameters = {
        "engine_model": engine_name,
        "max_length": manifest.max_length,
        "tokenizer_dir": TOKENIZER_DIR,
        "max_documents": options.max_documents,
        "max_inflight_pairs": max_inflight,
        "score_activation": manifest.score_activation,
        "source_model": manifest.source.get("model", ""),
        "random_weights": str(manifest.random_weights).lower(),
    }
    reranker_text = config_to_text(
        reranker_config(name, instances=options.reranker_instances, parameters=reranker_parameters),
        _header(manifest, f"Reranker model (entry point): query + documents -> scores, via {engine_name}."),
    )

    for destination, source in files.items():
        _place(artifact / source, staging / destination)
    if backend.key == "python":
        (engine_dir / "model.py").write_text(_model_source("ort_engine.py"), encoding="utf-8")
    reranker_dir = staging / name / "1"
    (reranker_dir / "model.py").write_text(_model_source("reranker.py"), encoding="utf-8")
    from ettin_runtime import packing

    _place(Path(packing.__file__), reranker_dir / PACKING_MODULE)
    configs = {engine_name: engine_text, name: reranker_text}
    for model, text in configs.items():
        (staging / model / "config.pbtxt").write_text(text, encoding="utf-8")

    check_repository(staging, manifest, graph, engine_name, name, builds_offsets=not backend.offsets_from_batch_input)
    requirements = PYTHON_REQUIREMENTS["reranker"] + PYTHON_REQUIREMENTS.get(backend.key, [])
    tensorrt_version = engine.get("tensorrt_version") if backend.key == "tensorrt" else None
    server_args = [f"--backend-config=python,thread-pool-size={max(32, max_inflight)}"]
    marker = {
        "generated_by": "ettin-export deploy triton",
        "artifact": str(artifact.resolve()),
        "source": manifest.source,
        "target": manifest.target,
        "precision": manifest.precision,
        "max_length": manifest.max_length,
        "reranker_model": name,
        "engine_model": engine_name,
        "engine_backend": backend.key,
        "max_batch_size": max_batch_size,
        "python_requirements": requirements,
        "tensorrt_version": tensorrt_version,
        "server_args": server_args,
        "serving_notes": serving_notes,
        "warnings": warnings,
        "files": {dest: manifest.files[src] for dest, src in files.items() if src in manifest.files},
    }
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return DeployedRepository(staging, name, engine_name, backend.key, max_batch_size, configs, requirements,
                              tensorrt_version, server_args, serving_notes, warnings)


def check_repository(root: Path, manifest: Manifest, graph, engine_name: str, reranker_name: str,
                     *, builds_offsets: bool) -> None:
    """Parse every config.pbtxt back from disk against the schema and cross-check it; check that the
    files each model loads are inside the repository."""
    engine = parse_config((root / engine_name / "config.pbtxt").read_text(), f"{engine_name}/config.pbtxt")
    reranker = parse_config((root / reranker_name / "config.pbtxt").read_text(), f"{reranker_name}/config.pbtxt")
    problems = []
    for config, folder in ((engine, engine_name), (reranker, reranker_name)):
        if config.name != folder:
            problems.append(f"{folder}/config.pbtxt names the model {config.name!r}; Triton requires the folder name")
    check_engine_config(engine, graph, manifest=manifest, builds_offsets=builds_offsets)
    version = root / engine_name / "1"
    if engine.platform == "tensorrt_plan":
        if list(engine.cc_model_filenames) != [str(manifest.engine.get("compute_capability"))]:
            problems.append(f"cc_model_filenames {dict(engine.cc_model_filenames)} does not map the plan's compute "
                            f"capability {manifest.engine.get('compute_capability')}")
        needed = list(engine.cc_model_filenames.values())
    elif engine.backend == "python":
        needed = ["model.py", engine.parameters["onnx_file"].string_value]
    else:
        needed = [engine.default_model_filename or "model.onnx"]
    if manifest.engine.get("external_data") and engine.platform != "tensorrt_plan":
        needed.append(manifest.engine["external_data"])
    parameters = {k: v.string_value for k, v in reranker.parameters.items()}
    if parameters.get("engine_model") != engine_name:
        problems.append(f"the reranker calls {parameters.get('engine_model')!r}, not the engine model {engine_name!r}")
    if int(parameters.get("max_length", -1)) != manifest.max_length:
        problems.append(f"the reranker truncates to {parameters.get('max_length')} tokens, the engine is built for "
                        f"{manifest.max_length}")
    missing = [str((version / n).relative_to(root)) for n in needed if not (version / n).is_file()]
    reranker_version = root / reranker_name / "1"
    for n in ("model.py", PACKING_MODULE, f"{parameters.get('tokenizer_dir')}/tokenizer.json"):
        if not (reranker_version / n).is_file():
            missing.append(str((reranker_version / n).relative_to(root)))
    if missing:
        problems.append(f"files the models load are missing from the repository: {missing}")
    if problems:
        raise ConfigError("The generated repository is inconsistent: " + "; ".join(problems) + ".")


def _publish(staging: Path, repo: Path) -> None:
    backup = repo.parent / f".{repo.name}.old-{os.getpid()}"
    if repo.exists():
        repo.rename(backup)
    staging.rename(repo)
    if backup.exists():
        shutil.rmtree(backup)
