"""What every target's build shares: the options, the fp32 reference model and its parity run, and the
artifact's files and manifest before and after the gate."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ettin_runtime.artifact import (
    MANIFEST_NAME,
    PARITY_NAME,
    TOKENIZER_FILES,
    Artifact,
    Engine,
    Limits,
    ModelFacts,
    ParitySummary,
    Source,
    hash_files,
)
from ettin_runtime.packing import PairEncoder

from ettin_export import __version__
from ettin_export.checkpoint import Checkpoint
from ettin_export.errors import BuildError
from ettin_export.parity import ParityReport, builtin_parity_set, read_parity_file
from ettin_export.parity.references import ReferenceMismatch
from ettin_export.parity.run import reference_run
from ettin_export.progress import Steps
from ettin_export.targets import Target


@dataclass
class BuildOptions:
    out: Path
    target: Target
    max_length: int | None = None  # None: the checkpoint decides, as CrossEncoder does
    max_batch_pairs: int | None = None
    max_batch_tokens: int | None = None
    force: bool = False
    onnx_only: bool = False
    check_crossencoder: bool = True
    parity_queries: int | None = None  # None: default_parity_queries() for the model and target
    parity_pairs: str | None = None  # a pairs file to gate on instead of the built-in set
    int8_max_fp32_layers: int | None = None  # int8 failing its gate: at most this many layers back to fp32 (None: a quarter)
    precision: str | None = None  # None: the target's (cpu: fp32; also int8, bf16)
    runtime: str | None = None  # None: the fastest of the precision's runtimes installed here
    traffic: str = "nq-like"  # the pairs runtimes are timed on: a length profile or a JSON-lines pairs file
    quiet: bool = False
    command_line: list[str] = field(default_factory=lambda: list(sys.argv))


def default_parity_queries(checkpoint: Checkpoint, target: Target) -> int:
    """Ten queries (~600 pairs) where that is cheap; on a CPU, two (~120 pairs) for models of hidden
    size above 512, whose reference and ONNX Runtime passes over ten would take 10+ minutes on two
    cores. --parity-queries overrides."""
    if target.engine == "onnx" and checkpoint.config.hidden_size > 512:
        return 2
    return 10


def reference_model(checkpoint: Checkpoint, options: BuildOptions, steps: Steps):
    """The fp32 model (the export source), its encoder, and the parity run (the parity set and the
    validation grid with their references, port-checked) before anything is exported."""
    from ettin_export.graph.validate import validation_batches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with steps.step("building the packed PyTorch model (fp32)"):
        model = checkpoint.build_model(torch.float32)
        encoder = PairEncoder.from_dir(checkpoint.path, options.max_length)
        if options.parity_pairs:
            groups = read_parity_file(options.parity_pairs)
        else:
            queries = options.parity_queries or default_parity_queries(checkpoint, options.target)
            groups = builtin_parity_set(seed=0, queries=queries)
    try:
        run = reference_run(checkpoint, encoder, groups, device=device, steps=steps,
                            crossencoder=options.check_crossencoder, grid=validation_batches(encoder), model=model)
    except ReferenceMismatch as error:
        raise BuildError(str(error)) from error
    return model, run


def copy_tokenizer_files(checkpoint: Checkpoint, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        source = checkpoint.path / name
        if source.is_file():
            shutil.copy2(source, directory / name)


def new_artifact(checkpoint: Checkpoint, options: BuildOptions, directory: Path, *, engine: Engine,
                 limits: Limits, precision: str | None = None) -> Artifact:
    """The artifact of the files now in `directory` (all hashed), before parity."""
    from ettin_export.parity.references import weights_fingerprint

    config = checkpoint.config
    files = [p.name for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST_NAME, PARITY_NAME)]
    return Artifact(
        root=directory,
        source=Source(model=checkpoint.source, revision=checkpoint.revision, layout=checkpoint.layout,
                      size=checkpoint.size, random_weights=checkpoint.random_weights,
                      weights_sha256=weights_fingerprint(checkpoint)),
        model=ModelFacts(hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
                         head_dim=config.head_dim, intermediate_size=config.intermediate_size,
                         windows=tuple(config.windows), pooling=config.head.pooling, vocab_size=config.vocab_size,
                         max_positions=config.max_positions),
        score_activation=checkpoint.activation, max_length=options.max_length, target=options.target.name,
        precision=precision or options.target.precision, engine=engine, limits=limits,
        files=hash_files(directory, files), created_by=f"ettin-export {__version__}",
    )


def finish_artifact(artifact: Artifact, report: ParityReport) -> Artifact:
    (artifact.root / PARITY_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    artifact = artifact.replace(parity=ParitySummary.from_json(report.summary()))
    artifact.write()
    return artifact


def onnx_engine(path: Path, external_data: Path | None, **changes) -> Engine:
    import onnx
    import onnxruntime

    proto = onnx.load(str(path), load_external_data=False)
    fields = dict(format="onnx", file=path.name, runtime="onnxruntime",
                  external_data=external_data.name if external_data else None,
                  opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                  onnxruntime_version=onnxruntime.__version__)
    return Engine(**{**fields, **changes})

