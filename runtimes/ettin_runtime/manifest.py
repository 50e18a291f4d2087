"""The artifact directory's manifest.json: the one schema every stage reads (build writes it; the
ONNX Runtime, TensorRT and Triton stages and `deploy` read it). Checked on load.

Schema, format_version 1 (fields are never renamed within a format version; new optional fields may
be added, readers ignore unknown ones):

    format_version      int, 1
    created_by          "ettin-export <version>"
    created_at          ISO-8601 UTC
    source              {model, revision, layout, size, random_weights}
    model               {hidden_size, num_layers, num_heads, head_dim, intermediate_size, windows, pooling,
                         vocab_size}
    score_activation    the checkpoint's own activation ("identity" | "sigmoid"); runtimes return raw
                        scores unless asked
    max_length          tokens per pair (serving default 512); pairs are truncated to it
    target              "cpu" | "h100" | ... (a preset in ettin_export.targets)
    precision           "fp32" | "bf16"
    engine              {format: "onnx" | "tensorrt", file, external_data (or null), opset,
                         onnxruntime_version, tensorrt_version, compute_capability, ptx_version}
    inputs / outputs    [{name, dtype, shape}] of the graph (shape entries are ints or axis names)
    limits              {max_batch_pairs, max_batch_tokens} the runtime batches within (for TensorRT
                        the engine profile: also min/opt)
    files               {relative path: sha256} of every file a runtime needs
    parity              summary of the parity report (parity.json holds the whole report)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
GRAPH_INPUTS = (
    {"name": "input_ids", "dtype": "int32", "shape": ["total_tokens"]},
    {"name": "cu_seqlens", "dtype": "int32", "shape": ["num_pairs_plus_1"]},
)
GRAPH_OUTPUTS = ({"name": "scores", "dtype": "float32", "shape": ["num_pairs", 1]},)


class ArtifactError(ValueError):
    """An artifact that cannot be used as is: missing, corrupt, too new, or for another runtime."""


@dataclass
class Manifest:
    source: dict
    model: dict
    score_activation: str
    max_length: int
    target: str
    precision: str
    engine: dict
    limits: dict
    files: dict = field(default_factory=dict)
    parity: dict | None = None
    inputs: list = field(default_factory=lambda: [dict(x) for x in GRAPH_INPUTS])
    outputs: list = field(default_factory=lambda: [dict(x) for x in GRAPH_OUTPUTS])
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    )

    @property
    def random_weights(self) -> bool:
        return bool(self.source.get("random_weights"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(directory: str | Path, names: list[str]) -> dict[str, str]:
    root = Path(directory)
    return {name: sha256_file(root / name) for name in names}


def read_manifest(directory: str | Path, *, verify_files: bool = True) -> Manifest:
    """Load and check an artifact's manifest: present, parseable, a known format, every listed file
    present with the recorded sha256."""
    root = Path(directory)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory. Pass the artifact folder written by `ettin-export build`.")
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_NAME}: it is not an ettin-export artifact (or the build did not finish). "
            "Rebuild it with `ettin-export build ... --out DIR`."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is corrupt ({error}). Rebuild the artifact.") from error
    version = data.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path} has no integer format_version; it is not an ettin-export manifest.")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} is format version {version}, newer than this ettin-export understands ({FORMAT_VERSION}). "
            "Upgrade ettin-export (pip install -U ettin-export) to load it."
        )
    missing_fields = [f for f in ("model", "engine", "max_length", "precision", "target", "files") if f not in data]
    if missing_fields:
        raise ArtifactError(f"{path} lacks required fields {missing_fields}. Rebuild the artifact.")
    manifest = Manifest.from_dict(data)
    if verify_files:
        verify_artifact_files(root, manifest)
    return manifest


def verify_artifact_files(root: Path, manifest: Manifest) -> None:
    problems = []
    for name, expected in manifest.files.items():
        file = root / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(file) != expected:
            problems.append(f"{name} does not match its recorded sha256 (corrupt or modified)")
    if problems:
        raise ArtifactError(
            f"Artifact {root} is damaged: {'; '.join(problems)}. Copy it again or rebuild it with "
            "`ettin-export build`."
        )
