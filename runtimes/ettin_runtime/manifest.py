"""The parts of an artifact's manifest.json, as typed, frozen data with their JSON form and validation:
where the weights came from (`Source`), the model's facts (`ModelFacts`), the engine (`Engine`, with
`TensorRTFacts` for a plan), the batch limits (`Limits`, with the TensorRT optimization `Profile`), the
parity summary (`ParitySummary`), the graph's tensors (`TensorSpec`) and the format's constants.
`ettin_runtime.artifact.Artifact` holds them (and ettin_runtime.artifact re-exports them).

Within format version 1 fields are never renamed; new optional fields may be added and readers
ignore unknown ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .checks import whole_number
from .errors import ArtifactError

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


def positive_int(value, what: str) -> int:
    if not whole_number(value):
        raise ArtifactError(f"manifest {what} is {value!r}; expected a positive integer. Rebuild the artifact.")
    return value


def _triple(value, what: str) -> tuple[int, int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3):
        raise ArtifactError(f"manifest {what} is {value!r}; expected [min, opt, max]. Rebuild the artifact.")
    low, opt, high = (positive_int(v, what) for v in value)
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
        return cls(positive_int(data.get("max_batch_pairs", DEFAULT_MAX_BATCH_PAIRS), "limits.max_batch_pairs"),
                   positive_int(data.get("max_batch_tokens", DEFAULT_MAX_BATCH_TOKENS), "limits.max_batch_tokens"))


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
    runtime: str  # the ettin_runtime.loading.RUNTIMES key that runs it
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


# The runtime an engine format is run by when the manifest names none.
DEFAULT_RUNTIME = {"onnx": "onnxruntime", "tensorrt": "tensorrt"}
