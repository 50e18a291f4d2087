"""The artifact folder: the contract between `ettin-export build` and every later stage.

    ARTIFACT/
      manifest.json      this module's `Artifact`, as JSON (format_version 1)
      parity.json        the whole parity report (the manifest keeps its summary)
      model.onnx | model.plan (+ model.onnx.data), tokenizer files

`Artifact` is typed, frozen data: where the weights came from (`Source`), the model's facts
(`ModelFacts`), the engine (`Engine`, with `TensorRTFacts` for a plan), the batch limits (`Limits`,
with the TensorRT optimization `Profile`), the file hashes and the parity summary. Every part has its
JSON form and its validation here, and nothing else reads manifest.json. `Artifact.open(dir)` checks
the folder and every file's sha256 once; `artifact.load()` hands out a runtime from the `RUNTIMES`
registry. `StagedFolder` is the one writer's transaction (build and deploy): assemble beside the
destination, then publish or reject, never half-written.

Within format version 1 fields are never renamed; new optional fields may be added and readers
ignore unknown ones.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError

if TYPE_CHECKING:
    from .reranker import Reranker

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PARITY_NAME = "parity.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
RANDOM_SOURCE_PREFIX = "random:"  # source.model of a random-weights checkpoint of an exact Ettin size

# The graph's serving contract: exactly what a batcher hands over, and the one output. The exporter
# writes these names, the validators and deploy check them, the TensorRT profile is keyed by them.
INPUT_IDS, CU_SEQLENS, SCORES = "input_ids", "cu_seqlens", "scores"
TOTAL_TOKENS, NUM_PAIRS_PLUS_1, NUM_PAIRS = "total_tokens", "num_pairs_plus_1", "num_pairs"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int32", "float32", ...
    shape: tuple  # ints (static) or strings (named dynamic axes)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))


GRAPH_INPUTS = (TensorSpec(INPUT_IDS, "int32", (TOTAL_TOKENS,)), TensorSpec(CU_SEQLENS, "int32", (NUM_PAIRS_PLUS_1,)))
GRAPH_OUTPUTS = (TensorSpec(SCORES, "float32", (NUM_PAIRS, 1)),)

# Batch limits of a CPU artifact when the build is given none: the most pairs and tokens per run its
# graph is validated with (the runtime batches within them; the CPU provider runs best far below).
DEFAULT_MAX_BATCH_PAIRS = 256
DEFAULT_MAX_BATCH_TOKENS = 16384


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArtifactError(f"manifest {what} is {value!r}; expected a positive integer. Rebuild the artifact.")
    return value


def _triple(value, what: str) -> tuple[int, int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3):
        raise ArtifactError(f"manifest {what} is {value!r}; expected [min, opt, max]. Rebuild the artifact.")
    low, opt, high = (_positive_int(v, what) for v in value)
    if not low <= opt <= high:
        raise ArtifactError(f"manifest {what} is {list(value)}; expected min <= opt <= max. Rebuild the artifact.")
    return low, opt, high


# --- the parts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where the weights came from."""

    model: str | None  # a path, a hub id, or "random:<size>"
    revision: str | None = None
    layout: str | None = None  # "sentence-transformers" | "hf-sequence-classification"
    size: str | None = None  # the Ettin size, when known
    random_weights: bool = False
    weights_sha256: str | None = None

    @property
    def random_size(self) -> str | None:
        """The Ettin size of a random-weights source ("random:17m" -> "17m"), else None."""
        model = self.model or ""
        return model[len(RANDOM_SOURCE_PREFIX):] if model.startswith(RANDOM_SOURCE_PREFIX) else None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> Source:
        return cls(**{k: data.get(k) for k in ("model", "revision", "layout", "size", "weights_sha256")},
                   random_weights=bool(data.get("random_weights", False)))


@dataclass(frozen=True)
class ModelFacts:
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    windows: tuple[int, ...]  # per layer: -1 global, else the inclusive local half-width
    pooling: str  # "cls" | "mean"
    vocab_size: int
    max_positions: int | None = None  # the model's max_position_embeddings: no pair may be longer

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "windows": list(self.windows)}

    @classmethod
    def from_json(cls, data: Mapping) -> ModelFacts:
        try:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name not in ("windows", "max_positions")},
                       windows=tuple(int(w) for w in data["windows"]), max_positions=data.get("max_positions"))
        except (KeyError, TypeError) as error:
            raise ArtifactError(f"manifest model facts are incomplete ({error}). Rebuild the artifact.") from error


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: (min, opt, max) tokens and pairs per run. Its JSON form is
    keyed by the graph's dynamic axes (total_tokens, num_pairs_plus_1 = pairs + 1)."""

    tokens: tuple[int, int, int]
    pairs: tuple[int, int, int]

    @property
    def max_tokens(self) -> int:
        return self.tokens[2]

    @property
    def max_pairs(self) -> int:
        return self.pairs[2]

    def shapes(self) -> dict[str, tuple[tuple[int], tuple[int], tuple[int]]]:
        """{input name: ((min,), (opt,), (max,))}, as TensorRT's profile takes them."""
        return {INPUT_IDS: tuple((v,) for v in self.tokens), CU_SEQLENS: tuple((v + 1,) for v in self.pairs)}

    def to_json(self) -> dict:
        return {TOTAL_TOKENS: list(self.tokens), NUM_PAIRS_PLUS_1: [p + 1 for p in self.pairs]}

    @classmethod
    def from_json(cls, data: Mapping) -> Profile:
        if not isinstance(data, Mapping):
            raise ArtifactError(f"manifest limits.profile is {data!r}; expected {{{TOTAL_TOKENS}, {NUM_PAIRS_PLUS_1}}}.")
        tokens = _triple(data.get(TOTAL_TOKENS), f"limits.profile.{TOTAL_TOKENS}")
        plus_one = _triple(data.get(NUM_PAIRS_PLUS_1), f"limits.profile.{NUM_PAIRS_PLUS_1}")
        if plus_one[0] < 2:
            raise ArtifactError(f"manifest limits.profile.{NUM_PAIRS_PLUS_1} starts at {plus_one[0]}; a run holds at "
                                "least one pair (2). Rebuild the artifact.")
        return cls(tokens, tuple(p - 1 for p in plus_one))


@dataclass(frozen=True)
class Limits:
    """What one run of the engine takes: at most `max_batch_pairs` pairs and `max_batch_tokens` tokens.
    A TensorRT engine's limits are its profile's maxima."""

    max_batch_pairs: int
    max_batch_tokens: int
    profile: Profile | None = None

    @classmethod
    def of_profile(cls, profile: Profile) -> Limits:
        return cls(profile.max_pairs, profile.max_tokens, profile)

    def to_json(self) -> dict:
        if self.profile is not None:
            return {"profile": self.profile.to_json()}
        return {"max_batch_pairs": self.max_batch_pairs, "max_batch_tokens": self.max_batch_tokens}

    @classmethod
    def from_json(cls, data: Mapping | None) -> Limits:
        data = data or {}
        if data.get("profile") is not None:
            return cls.of_profile(Profile.from_json(data["profile"]))
        return cls(_positive_int(data.get("max_batch_pairs", DEFAULT_MAX_BATCH_PAIRS), "limits.max_batch_pairs"),
                   _positive_int(data.get("max_batch_tokens", DEFAULT_MAX_BATCH_TOKENS), "limits.max_batch_tokens"))


@dataclass(frozen=True)
class TensorRTFacts:
    """What a TensorRT plan needs of the machine that runs it."""

    tensorrt_version: str
    compute_capability: str  # "9.0"
    ptx_version: str | None = None  # the plugin kernels' PTX ISA ("8.4"): the driver must JIT it
    ptx_target: str | None = None  # "sm_90a"
    gpu_name: str | None = None
    driver_version: str | None = None
    cuda_driver_version: int | None = None  # cuDriverGetVersion of the build machine
    plugin_layers: int | None = None
    attention_nodes: int | None = None

    @classmethod
    def from_json(cls, data: Mapping) -> TensorRTFacts:
        if not data.get("tensorrt_version") or not data.get("compute_capability"):
            raise ArtifactError("a TensorRT artifact's manifest must record tensorrt_version and compute_capability. "
                                "Rebuild it with `ettin-export build --target h100`.")
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


# Engine facts stored as plain fields of the engine's JSON object (the rest is kept in `record`).
_ENGINE_FIELDS = ("format", "file", "runtime", "external_data", "complete", "finish_command", "opset",
                  "onnxruntime_version")


@dataclass(frozen=True)
class Engine:
    format: str  # "onnx" | "tensorrt": what `file` is
    file: str
    runtime: str  # the RUNTIMES key that runs it
    external_data: str | None = None  # model.onnx.data beside a >2 GiB graph
    complete: bool = True  # False: the ONNX of a TensorRT build made with --onnx-only
    finish_command: str | None = None  # how to finish an incomplete build
    opset: int | None = None
    onnxruntime_version: str | None = None
    tensorrt: TensorRTFacts | None = None
    record: Mapping[str, Any] = field(default_factory=dict)  # build facts for the record (builder, kernel, ...)

    @property
    def files(self) -> tuple[str, ...]:
        """The files a runtime opens for this engine."""
        return (self.file,) + ((self.external_data,) if self.external_data else ())

    def to_json(self) -> dict:
        data = {name: getattr(self, name) for name in _ENGINE_FIELDS}
        if self.tensorrt is not None:
            data.update(dataclasses.asdict(self.tensorrt))
        data.update(self.record)
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> Engine:
        engine_format = data.get("format")
        if engine_format not in DEFAULT_RUNTIME:
            raise ArtifactError(f"unknown engine format {engine_format!r} in manifest.json (known: "
                                f"{', '.join(DEFAULT_RUNTIME)}). Upgrade ettin-export or rebuild the artifact.")
        if not data.get("file"):
            raise ArtifactError("manifest.json names no engine file. Rebuild the artifact.")
        tensorrt = TensorRTFacts.from_json(data) if engine_format == "tensorrt" else None
        known = set(_ENGINE_FIELDS) | {f.name for f in dataclasses.fields(TensorRTFacts)} | {"profile"}
        return cls(
            format=engine_format, file=str(data["file"]),
            runtime=str(data.get("runtime") or DEFAULT_RUNTIME[engine_format]),
            external_data=data.get("external_data"), complete=data.get("complete") is not False,
            finish_command=data.get("finish_command"), opset=data.get("opset"),
            onnxruntime_version=data.get("onnxruntime_version"), tensorrt=tensorrt,
            record={k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class ParitySummary:
    """The parity report's short form (parity.json holds the whole report)."""

    passed: bool
    candidate: str | None = None
    reference: str | None = None
    queries: int | None = None
    pairs: int | None = None
    max_abs_diff: float | None = None
    max_abs_bound: float | None = None
    figures: Mapping[str, Any] = field(default_factory=dict)  # everything else the summary holds

    def to_json(self) -> dict:
        named = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "figures"}
        return {**named, **self.figures}

    @classmethod
    def from_json(cls, data: Mapping | None) -> ParitySummary | None:
        if data is None:
            return None
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("passed", "figures")]
        return cls(passed=bool(data.get("passed")), **{k: data.get(k) for k in names},
                   figures={k: v for k, v in data.items() if k not in names and k != "passed"})


# --- the artifact ------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(directory: str | Path, names) -> dict[str, str]:
    root = Path(directory)
    return {name: sha256_file(root / name) for name in sorted(names)}


def is_artifact(path: str | Path | None) -> bool:
    """Whether `path` is an artifact folder (as opposed to a checkpoint folder or a hub id)."""
    return path is not None and (Path(path) / MANIFEST_NAME).is_file()


def lost_manifest(path: str | Path | None) -> str | None:
    """Why `path` is an artifact folder without its manifest.json (None when it is not one): a folder
    holding an artifact's own files (parity.json, the engine) but no config.json and no manifest.json.
    Said as itself, rather than as a checkpoint that lacks config.json."""
    if path is None or is_artifact(path) or not Path(path).is_dir() or (Path(path) / "config.json").is_file():
        return None
    found = [name for name in (PARITY_NAME, "model.onnx", "model.plan") if (Path(path) / name).is_file()]
    if not found:
        return None
    return (f"{path} holds {', '.join(found)} but no {MANIFEST_NAME}: it is an ettin-export artifact whose manifest "
            "was deleted (or a build that never finished), and without it nothing can check its files. Copy the "
            "artifact again, or rebuild it with `ettin-export build ... --out DIR`.")


_WARNED_ELSEWHERE: set[str] = set()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Artifact:
    root: Path
    source: Source
    model: ModelFacts
    score_activation: str  # the checkpoint's own ("identity" | "sigmoid"); runtimes return raw scores unless asked
    max_length: int  # tokens per pair; pairs are truncated to it
    target: str  # "cpu" | "h100" (a preset in ettin_export.targets)
    precision: str  # "fp32" | "bf16"
    engine: Engine
    limits: Limits
    files: Mapping[str, str] = field(default_factory=dict)  # {file name: sha256} of every file a runtime needs
    parity: ParitySummary | None = None
    inputs: tuple[TensorSpec, ...] = GRAPH_INPUTS
    outputs: tuple[TensorSpec, ...] = GRAPH_OUTPUTS
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    created_at: str = field(default_factory=_now)

    @property
    def random_weights(self) -> bool:
        return self.source.random_weights

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def path(self, name: str) -> Path:
        return self.root / name

    def replace(self, **changes) -> Artifact:
        return dataclasses.replace(self, **changes)

    # JSON ---------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "source": self.source.to_json(), "model": self.model.to_json(),
            "score_activation": self.score_activation, "max_length": self.max_length, "target": self.target,
            "precision": self.precision, "engine": self.engine.to_json(), "limits": self.limits.to_json(),
            "files": dict(self.files), "parity": None if self.parity is None else self.parity.to_json(),
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "format_version": self.format_version, "created_by": self.created_by, "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: Mapping, root: str | Path) -> Artifact:
        where = Path(root) / MANIFEST_NAME
        version = data.get("format_version")
        if not isinstance(version, int):
            raise ArtifactError(f"{where} has no integer format_version; it is not an ettin-export manifest.")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{where} is format version {version}, newer than this ettin-export understands ({FORMAT_VERSION}). "
                "Upgrade ettin-export (pip install -U ettin-export) to load it."
            )
        missing = [f for f in ("model", "engine", "max_length", "precision", "target", "files") if f not in data]
        if missing:
            raise ArtifactError(f"{where} lacks required fields {missing}. Rebuild the artifact.")
        try:
            return cls(
                root=Path(root), source=Source.from_json(data.get("source") or {}),
                model=ModelFacts.from_json(data["model"]), score_activation=data.get("score_activation", "identity"),
                max_length=_positive_int(data["max_length"], "max_length"), target=str(data["target"]),
                precision=str(data["precision"]), engine=Engine.from_json(data["engine"]),
                limits=Limits.from_json(data.get("limits")), files=dict(data["files"]),
                parity=ParitySummary.from_json(data.get("parity")),
                inputs=tuple(TensorSpec.from_json(t) for t in data.get("inputs") or [t.to_json() for t in GRAPH_INPUTS]),
                outputs=tuple(TensorSpec.from_json(t) for t in data.get("outputs") or [t.to_json() for t in GRAPH_OUTPUTS]),
                format_version=version, created_by=data.get("created_by", ""), created_at=data.get("created_at", ""),
            )
        except ArtifactError as error:
            raise ArtifactError(f"{where}: {error}") from None

    def write(self, directory: str | Path | None = None) -> Path:
        path = Path(directory or self.root) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    # Opening ------------------------------------------------------------------------------------------

    @classmethod
    def read(cls, directory: str | Path) -> Artifact:
        """The manifest alone, checked for form; no file is hashed (see `open`)."""
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"an artifact folder is a path (str or pathlib.Path), got {type(directory).__name__} "
                            f"{directory!r:.60}.")
        root = Path(directory)
        if not root.is_dir():
            raise ArtifactError(f"{root} is not a directory. Pass the artifact folder written by `ettin-export build`.")
        path = root / MANIFEST_NAME
        if not path.is_file() and lost_manifest(root):
            raise ArtifactError(lost_manifest(root))
        if not path.is_file():
            raise ArtifactError(
                f"{root} has no {MANIFEST_NAME}: it is not an ettin-export artifact (or the build did not finish). "
                "Rebuild it with `ettin-export build ... --out DIR`."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ArtifactError(f"{path} is corrupt ({error}). Rebuild the artifact.") from error
        if not isinstance(data, dict):
            raise ArtifactError(f"{path} is not a JSON object. Rebuild the artifact.")
        return cls.from_json(data, root)

    @classmethod
    def open(cls, directory: str | Path, *, allow_unverified: bool = False) -> Artifact:
        """The artifact at `directory`, with every file a runtime opens recorded, present and matching
        its sha256, and its parity gate passed. `allow_unverified` opens one that failed its gate (a
        build kept at OUT.rejected) or never reached it (a staging folder left by an interrupted
        build), for inspection only."""
        artifact = cls.read(directory)
        artifact.verify_files()
        if not allow_unverified:
            artifact.require_verified()
        return artifact

    def require_verified(self) -> None:
        if not self.engine.complete:
            return  # an --onnx-only build is not judged yet; runtimes refuse it with how to finish it
        rebuild = ("Rebuild it with `ettin-export build ... --out DIR` (the same command, with --force if DIR "
                   "exists); to inspect it anyway, pass --allow-unverified (Python: Artifact.open(dir, "
                   "allow_unverified=True)).")
        if self.parity is None:
            raise ArtifactError(
                f"{self.root} never passed a parity gate: its manifest has no parity result, so it is a staging "
                f"folder of a build that did not finish (interrupted, or still running). {rebuild}"
            )
        if not self.parity.passed:
            figures = (f" (max |Δ| {self.parity.max_abs_diff:.3g} against the bound {self.parity.max_abs_bound:.3g})"
                       if self.parity.max_abs_diff is not None and self.parity.max_abs_bound is not None else "")
            raise ArtifactError(
                f"{self.root} FAILED its parity gate{figures}: it is a rejected build (parity.json has the report), "
                f"not an artifact to serve. {rebuild}"
            )
        report = self.root / PARITY_NAME  # the whole report: the manifest's summary must say what it says
        try:
            passed = json.loads(report.read_text(encoding="utf-8")).get("passed")
        except (OSError, ValueError, AttributeError) as error:
            detail = "is missing" if not report.is_file() else f"cannot be read ({type(error).__name__})"
            raise ArtifactError(
                f"{self.root}: its manifest says the parity gate passed, but {PARITY_NAME}, the report it summarizes, "
                f"{detail}, so the claim cannot be checked. {rebuild}"
            ) from None
        if passed is not True:
            raise ArtifactError(
                f"{self.root}: its manifest says the parity gate passed, but {PARITY_NAME} says "
                f"{'failed' if passed is False else f'passed: {json.dumps(passed)}'}: the two disagree (one was edited "
                f"by hand), so it is refused. {rebuild}"
            )

    def verify_files(self) -> None:
        unrecorded = [name for name in (*self.engine.files, TOKENIZER_FILES[0]) if name not in self.files]
        if unrecorded:
            raise ArtifactError(
                f"Artifact {self.root}: the manifest records no sha256 for {', '.join(unrecorded)}, which a runtime "
                "opens, so it cannot be checked. Rebuild the artifact with `ettin-export build`."
            )
        problems = []
        for name, expected in self.files.items():
            file = self.root / name
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif sha256_file(file) != expected:
                problems.append(f"{name} does not match its recorded sha256 (corrupt or modified)")
        if problems:
            raise ArtifactError(
                f"Artifact {self.root} is damaged: {'; '.join(problems)}. Copy it again or rebuild it with "
                "`ettin-export build`."
            )

    def require_complete(self) -> None:
        if not self.engine.complete:
            raise ArtifactError(
                f"{self.root} holds only the {self.precision} ONNX of a {self.target} build (--onnx-only); it has no "
                "engine yet. Finish it on a machine with TensorRT and the target GPU: "
                f"{self.engine.finish_command or 'ettin-export build ... --target ' + self.target}"
            )

    def load(self, runtime: str | None = None, **options) -> Reranker:
        """A runtime for this artifact: `runtime` (a RUNTIMES key) or the one its engine names. Options
        are `LoadOptions` fields (device, threads, max_length, max_batch_tokens, max_batch_pairs)."""
        from .reranker import LoadOptions

        name = self.runtime_for_this_cpu(options) if runtime == "auto" else runtime or self.engine.runtime
        if name not in RUNTIMES:
            raise ArtifactError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}.")
        load_options = LoadOptions(**options)
        self.check_options(load_options)
        module_name, class_name = RUNTIMES[name].split(":")
        backend = getattr(importlib.import_module(module_name), class_name)
        reranker = backend.from_artifact(self, load_options)
        self.warn_if_judged_elsewhere()
        return reranker

    def gate_passed_runtimes(self) -> list[str]:
        """The runtimes the build judged and that passed its gate (the engine's own first)."""
        gate = (self.engine.record.get("runtime_choice") or {}).get("gate") or {}
        passed = [name for name, verdict in gate.items() if verdict == "passed" and name in RUNTIMES]
        return sorted(set(passed) | {self.engine.runtime}, key=lambda name: name != self.engine.runtime)

    def runtime_for_this_cpu(self, options: Mapping) -> str:
        """runtime="auto": the manifest's runtime where the gate ran on this CPU class; on another class,
        the fastest here of the runtimes that passed the gate, timed on NQ-like batches (64 pairs of
        ~105 tokens, random token ids: speed does not depend on them), 3 interleaved rounds."""
        from .machine import cpu_class

        judged = self.judged_on()
        candidates = [name for name in self.gate_passed_runtimes() if importlib.util.find_spec(name) is not None]
        if len(candidates) < 2 or not judged or judged.get("class") == cpu_class():
            return self.engine.runtime
        import time

        import numpy as np

        from .packing import packed_batches

        rng = np.random.default_rng(0)
        lengths = np.clip(np.round(rng.lognormal(np.log(105), 0.5, 64)), 8, self.max_length).astype(int)
        ids = [rng.integers(1000, self.model.vocab_size, n).astype(np.int64) for n in lengths]
        loaded = {name: self.load(runtime=name, **options) for name in candidates}
        seconds: dict[str, list[float]] = {name: [] for name in candidates}
        try:
            for round_ in range(4):  # the first round warms up
                for name, reranker in loaded.items():
                    batches = packed_batches(ids, reranker.max_batch_tokens, reranker.max_batch_pairs)
                    start = time.perf_counter()
                    for batch in batches:
                        reranker._score(batch)
                    if round_:
                        seconds[name].append(time.perf_counter() - start)
        finally:
            for reranker in loaded.values():
                reranker.close()
        return min(candidates, key=lambda name: sorted(seconds[name])[1])

    def judged_on(self) -> Mapping | None:
        """The machine the parity gate ran on (CPU artifacts built since it was recorded), else None."""
        return (self.parity.figures.get("judged_on") if self.parity else None) or None

    def warn_if_judged_elsewhere(self) -> None:
        """Once per artifact folder and process: a CPU artifact loaded on a CPU of another kernel class
        than its gate's (ettin_runtime.machine.cpu_class) may score beyond what the gate saw."""
        from .machine import cpu_class, describe, this_machine

        judged = self.judged_on()
        if self.target != "cpu" or not judged or str(self.root) in _WARNED_ELSEWHERE:
            return
        if judged.get("class") != cpu_class():
            _WARNED_ELSEWHERE.add(str(self.root))
            warnings.warn(
                f"{self.root}: its {self.precision} parity gate ran on a CPU of class {judged.get('class')} "
                f"({judged.get('cpu')}); this one is {describe(this_machine())}. Its kernels differ, so its scores may "
                f"differ beyond what the gate saw: re-judge it here with `ettin-export verify {self.root}`.",
                RuntimeWarning, stacklevel=3)

    def check_options(self, options) -> None:
        """LoadOptions against this artifact's facts, before any runtime allocates anything."""
        from .packing import smallest_max_length_of

        longest = self.model.max_positions or self.max_length
        shortest = smallest_max_length_of(self.root)  # the pair template's special tokens + one of query, document
        length = self.max_length if options.max_length is None else options.max_length
        if isinstance(length, bool) or not isinstance(length, int) or not shortest <= length <= longest:
            raise ArtifactError(
                f"max_length {length!r} is outside what {self.root} can take: {shortest} to {longest} tokens (the "
                f"pair template's special tokens and one token each of query and document, to the model's "
                f"positions; the artifact was built and checked at {self.max_length}). Pass a max_length in that range."
            )
        device = options.device
        if not ((isinstance(device, int) and not isinstance(device, bool) and device >= 0) or
                (isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda|gpu|(cuda:)?\d+", device.strip().lower()))):
            raise ArtifactError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (a GPU's index); got {device!r}.")
        # max_batch_tokens is a packing budget: a pair longer than it runs alone, within the engine's limit.
        for name in ("max_batch_tokens", "max_batch_pairs", "threads"):
            value = getattr(options, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ArtifactError(f"{name} must be an integer of at least 1; got {value!r}.")


# The runtimes, by name: "module:Class" whose `from_artifact(artifact, LoadOptions)` returns a Reranker
# (imported only when asked for, so a runtime-only install needs only the runtime it uses).
RUNTIMES = {
    "onnxruntime": "ettin_runtime.backends.onnxruntime:OnnxRuntimeReranker",
    "openvino": "ettin_runtime.backends.openvino:OpenVinoReranker",
    "tensorrt": "ettin_runtime.backends.tensorrt:TensorRTReranker",
}
# The runtime an engine format is run by when the manifest names none.
DEFAULT_RUNTIME = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}


# --- the writer's transaction --------------------------------------------------------------------------------


def unwritable_problem(destination: str | Path, option: str) -> str | None:
    """Why nothing can be written at `destination` (None: it can): its nearest existing folder above is a
    file, read-only or not writable for this user. Checked before any work, so that a long run never ends
    in an OSError where it writes."""
    destination = Path(destination).absolute()
    folder = destination.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return (f"{option} {destination}: {folder} is a file, not a folder, so nothing can be created under it. "
                f"Choose another {option}.")
    if not os.access(folder, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = ("is on a read-only file system" if read_only else
               "is not writable for this user (its permissions, or an immutable attribute: lsattr -d shows it)")
        return f"{option} {destination}: the folder {folder} {why}. Choose another {option}, or make {folder} writable."
    if destination.is_dir() and not os.access(destination, os.W_OK | os.X_OK):  # replaced: moved aside, then removed
        return (f"{option} {destination} cannot be replaced: it is not writable for this user (its permissions, or an "
                f"immutable attribute: lsattr -d shows it). Choose another {option}, or make it writable.")
    return None


def replacement_problem(destination: Path, *, force: bool, ours, option: str, foreign: str, holds: str,
                        keeps: str = "") -> str | None:
    """Why a writer may not replace `destination` (None: it may): a file there, a non-empty folder that
    is not `ours(path)` (ettin-export never deletes folders it did not write), or one of ours without
    --force. `foreign` and `holds` name what the folder is or holds, in the refusal."""
    if not destination.exists():
        return None
    if not destination.is_dir():
        return f"{option} {destination} exists and is not a folder."
    if not any(destination.iterdir()):
        return None
    if not ours(destination):
        return (f"{option} {destination} is a non-empty folder that {foreign}; choose another {option} "
                "(ettin-export never deletes folders it did not write).")
    if not force:
        return f"{option} {destination} already holds {holds}. Pass --force to replace it{keeps}, or choose another {option}."
    return None


class StagedFolder:
    """A folder assembled beside its destination and moved into place only when finished, so that an
    existing good folder is never lost to a failed or interrupted run:

        staging = StagedFolder(out)            # .OUT.building-<pid>/, fresh
        ... write into staging.path ...
        staging.publish()                      # OUT (the old one, if any, replaced), or
        staging.reject()                       # OUT.rejected, OUT untouched, or
        staging.discard()                      # nothing left
    """

    def __init__(self, destination: str | Path, kind: str = "building"):
        self.destination = Path(destination)
        self.path = self.destination.parent / f".{self.destination.name}.{kind}-{os.getpid()}"
        self.removed_stale = remove_stale_staging(self.destination)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def publish(self) -> Path:
        backup = self.destination.parent / f".{self.destination.name}.old-{os.getpid()}"
        if self.destination.exists():
            self.destination.rename(backup)
        self.path.rename(self.destination)
        if backup.exists():
            shutil.rmtree(backup)
        return self.destination

    def reject(self) -> Path:
        rejected = self.destination.parent / f"{self.destination.name}.rejected"
        if rejected.exists():
            shutil.rmtree(rejected)
        self.path.rename(rejected)
        return rejected

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_staging(destination: Path) -> list[Path]:
    """The hidden work folders (.NAME.<kind>-<pid>) that writers of `destination` left when their
    process died (killed, power lost), removed; those of live processes are left alone. A backup of the
    old destination (.NAME.old-<pid>) whose publish never finished is put back instead."""
    removed = []
    for candidate in sorted(destination.parent.glob(f".{destination.name}.*-*")):
        kind, _, pid = candidate.name[len(destination.name) + 2:].rpartition("-")
        if not (candidate.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid))):
            continue
        if kind == "old" and not destination.exists():
            candidate.rename(destination)  # the publish died between its two renames: the old one is back
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed
