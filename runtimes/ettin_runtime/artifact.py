"""The artifact folder: the contract between `ettin-export build` and every later stage.

    ARTIFACT/
      manifest.json      this module's `Artifact`, as JSON (format_version 1)
      parity.json        the whole parity report (the manifest keeps its summary)
      model.onnx | model.plan (+ model.onnx.data), tokenizer files

`Artifact` is typed, frozen data: where the weights came from (`Source`), the model's facts
(`ModelFacts`), the engine (`Engine`, with `TensorRTFacts` for a plan), the batch limits (`Limits`,
with the TensorRT optimization `Profile`), the file hashes and the parity summary. The parts, with
their JSON form and validation, are ettin_runtime.manifest's (importable from here too); this module
reads and checks the folder, and nothing else reads manifest.json. `Artifact.open(dir)` checks the
folder and every file's sha256 once; `artifact.load()` hands it to ettin_runtime.loading, which picks
and opens a runtime. The exporter writes artifacts through ettin_export.staging.

Within format version 1 fields are never renamed; new optional fields may be added and readers
ignore unknown ones.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import loading
from .errors import ArtifactError
from .manifest import (  # the manifest's parts: ettin_runtime.artifact is where importers take them from
    CU_SEQLENS,
    DEFAULT_MAX_BATCH_PAIRS,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_RUNTIME,
    FORMAT_VERSION,
    GRAPH_INPUTS,
    GRAPH_OUTPUTS,
    INPUT_IDS,
    MANIFEST_NAME,
    NUM_PAIRS,
    NUM_PAIRS_PLUS_1,
    PARITY_NAME,
    RANDOM_SOURCE_PREFIX,
    SCORES,
    TOKENIZER_FILES,
    TOTAL_TOKENS,
    Engine,
    Limits,
    ModelFacts,
    ParitySummary,
    Profile,
    Source,
    TensorRTFacts,
    TensorSpec,
    positive_int,
)

__all__ = ["CU_SEQLENS", "DEFAULT_MAX_BATCH_PAIRS", "DEFAULT_MAX_BATCH_TOKENS", "DEFAULT_RUNTIME",
    "FORMAT_VERSION", "GRAPH_INPUTS", "GRAPH_OUTPUTS", "INPUT_IDS", "MANIFEST_NAME", "NUM_PAIRS",
    "NUM_PAIRS_PLUS_1", "PARITY_NAME", "RANDOM_SOURCE_PREFIX", "SCORES", "TOKENIZER_FILES", "TOTAL_TOKENS",
    "Artifact", "Engine", "Limits", "ModelFacts", "ParitySummary", "Profile", "Source", "TensorRTFacts",
    "TensorSpec", "hash_files", "is_artifact", "lost_manifest", "sha256_file"]


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
                max_length=positive_int(data["max_length"], "max_length"), target=str(data["target"]),
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

    def load(self, runtime: str | None = None, **options):
        """A Reranker for this artifact: `runtime` (an ettin_runtime.loading.RUNTIMES key, or "auto") or
        the one its engine names. Options are `LoadOptions` fields (device, threads, max_length,
        max_batch_tokens, max_batch_pairs). ettin_runtime.loading.load_runtime does the work."""
        return loading.load_runtime(self, runtime, **options)

    def gate_passed_runtimes(self) -> list[str]:
        """The runtimes the build judged and that passed its gate (the engine's own first)."""
        return loading.gate_passed_runtimes(self)

    def judged_on(self) -> Mapping | None:
        """The machine the parity gate ran on (CPU artifacts built since it was recorded), else None."""
        return (self.parity.figures.get("judged_on") if self.parity else None) or None
