"""`ettin-export build`: checkpoint -> packed model -> ONNX -> session/engine -> parity -> artifact.

The artifact is assembled in a staging folder beside --out and moved into place only after parity
passes, so an existing good artifact is never lost to a failed or interrupted build.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ettin_runtime.manifest import MANIFEST_NAME, Manifest, hash_files

from . import __version__
from .checkpoint import Checkpoint
from .parity import ParityMetrics, ParityReport, builtin_parity_set, flatten, format_report, judge
from .progress import Steps
from .targets import Target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CROSSENCODER_CHECK_PAIRS = 48


class BuildError(RuntimeError):
    """The build stopped; the message says why and what to do. Nothing at --out was changed."""


@dataclass
class BuildOptions:
    out: Path
    target: Target
    max_length: int = 512
    max_batch_pairs: int | None = None
    max_batch_tokens: int | None = None
    force: bool = False
    onnx_only: bool = False
    check_crossencoder: bool = True
    parity_queries: int = 10
    quiet: bool = False


def prepare_output(out: Path, force: bool) -> None:
    """Refuse to overwrite unless asked, and never touch a folder that is not ours."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a folder.")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST_NAME).is_file():
        raise BuildError(
            f"--out {out} is a non-empty folder that is not an ettin-export artifact; choose another --out "
            "(ettin-export never deletes folders it did not write)."
        )
    if not force:
        raise BuildError(
            f"--out {out} already holds an artifact. Pass --force to replace it (the old one stays in place "
            "until the new one has passed parity), or choose another --out."
        )


def staging_dir(out: Path) -> Path:
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out: Path) -> None:
    """Swap the finished artifact into place: old -> backup, staging -> out, drop backup."""
    backup = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(backup)
    staging.rename(out)
    if backup.exists():
        shutil.rmtree(backup)


def crossencoder_check(checkpoint: Checkpoint, model, pairs, max_length: int) -> float:
    """Before exporting anything: the packed PyTorch model must match CrossEncoder to 1e-4 (fp32)."""
    from sentence_transformers import CrossEncoder

    from ettin_runtime.packing import PairEncoder

    from .torch_runtime import TorchReranker

    cross_encoder = CrossEncoder(
        str(checkpoint.path), activation_fn=torch.nn.Identity(), device="cpu", max_length=max_length
    )
    expected = cross_encoder.predict(pairs, batch_size=16, show_progress_bar=False, convert_to_numpy=True)
    ours = TorchReranker(model, PairEncoder.from_dir(checkpoint.path, max_length)).predict(pairs)
    return float(np.max(np.abs(ours - expected)))


def crossencoder_sample(pairs: list[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    """Longest pairs (truncated, across the local window) and a spread of the rest."""
    by_length = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    chosen = by_length[: count // 4] + by_length[count // 4 :: max(1, len(pairs) // count)][: count - count // 4]
    return [pairs[i] for i in chosen]


def build_cpu(checkpoint: Checkpoint, options: BuildOptions, steps: Steps) -> tuple[Path, ParityReport]:
    """fp32 ONNX for ONNX Runtime. Returns the staging folder and the parity report."""
    import onnxruntime

    from ettin_runtime.onnxruntime_backend import OnnxRuntimeReranker

    from .onnx_export import export_onnx
    from .torch_runtime import TorchReranker
    from .validate import check_graph_contract, check_values

    target = options.target
    with steps.step("building the packed PyTorch model (fp32)"):
        model = checkpoint.build_model(torch.float32)
        groups = builtin_parity_set(seed=0, queries=options.parity_queries)
        pairs, spans = flatten(groups)
    if options.check_crossencoder:
        with steps.step(f"checking the packed model against CrossEncoder ({CROSSENCODER_CHECK_PAIRS} pairs)"):
            diff = crossencoder_check(checkpoint, model, crossencoder_sample(pairs, CROSSENCODER_CHECK_PAIRS),
                                      options.max_length)
            if not diff <= 1e-4:
                raise BuildError(
                    f"the packed PyTorch model differs from CrossEncoder by {diff:.3g} (> 1e-4) on this checkpoint: "
                    "it uses something ettin-export does not reproduce. Nothing was exported."
                )
        steps.note(f"max |Δ| vs CrossEncoder: {diff:.2e}")
    staging = staging_dir(options.out)
    try:
        with steps.step("exporting fp32 ONNX (VarlenAttention custom op + local function body)"):
            exported = export_onnx(model, staging / "model.onnx", "fp32")
        with steps.step("validating the graph: names, dynamic axes, values on 12 unseen shapes"):
            import onnx

            check_graph_contract(onnx.load(str(exported.path), load_external_data=False), model.config.num_layers)
            session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
            worst = check_values(session, model, tolerance=1e-4)
        steps.note(f"max |Δ| ONNX Runtime vs PyTorch on the validation grid: {worst:.2e}")
        write_tokenizer_files(checkpoint, staging)
        limits = {
            "max_batch_pairs": options.max_batch_pairs or 256,
            "max_batch_tokens": options.max_batch_tokens or max(16384, options.max_length),
        }
        manifest = make_manifest(checkpoint, options, staging, engine={
            "format": "onnx", "file": "model.onnx",
            "external_data": exported.external_data.name if exported.external_data else None,
            "opset": _opset(exported.path), "onnxruntime_version": onnxruntime.__version__,
            "tensorrt_version": None, "compute_capability": None, "ptx_version": None,
        }, limits=limits)
        manifest.write(staging)
        with steps.step(f"parity on the built-in set ({len(pairs)} pairs, {len(groups)} queries)"):
            runtime = OnnxRuntimeReranker.load(staging, manifest)
            reference = TorchReranker(model, runtime.encoder)
            metrics = ParityMetrics.compute(reference.predict(pairs), runtime.predict(pairs), spans)
            report = judge(target, "onnxruntime fp32 (CPU)", "packed PyTorch fp32 (CPU reference attention)", metrics)
        finish_artifact(staging, manifest, report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, report


def write_tokenizer_files(checkpoint: Checkpoint, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        source = checkpoint.path / name
        if source.is_file():
            shutil.copy2(source, directory / name)


def make_manifest(checkpoint: Checkpoint, options: BuildOptions, directory: Path, *, engine: dict, limits: dict) -> Manifest:
    config = checkpoint.config
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST_NAME, "parity.json"))
    return Manifest(
        source={
            "model": checkpoint.source, "revision": checkpoint.revision, "layout": checkpoint.layout,
            "size": checkpoint.size, "random_weights": checkpoint.random_weights,
        },
        model={
            "hidden_size": config.hidden_size, "num_layers": config.num_layers, "num_heads": config.num_heads,
            "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
            "windows": list(config.windows), "pooling": config.head.pooling, "vocab_size": config.vocab_size,
        },
        score_activation=checkpoint.activation,
        max_length=options.max_length,
        target=options.target.name,
        precision=options.target.precision,
        engine=engine,
        limits=limits,
        files=hash_files(directory, files),
        created_by=f"ettin-export {__version__}",
    )


def finish_artifact(staging: Path, manifest: Manifest, report: ParityReport) -> None:
    (staging / "parity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    manifest.parity = report.summary()
    manifest.write(staging)


def _opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def run_build(checkpoint_loader, options: BuildOptions) -> int:
    """The whole command: returns the exit status (0 built, 1 parity failed, 2 refused)."""
    steps = Steps(f"ettin-export build --target {options.target.name} -> {options.out}", quiet=options.quiet)
    prepare_output(options.out, options.force)
    with steps.step("loading the checkpoint"):
        checkpoint: Checkpoint = checkpoint_loader()
    steps.note(
        f"{checkpoint.source} ({checkpoint.layout}; {checkpoint.config.num_layers} layers, hidden "
        f"{checkpoint.config.hidden_size}; random weights: {'yes' if checkpoint.random_weights else 'no'})"
    )
    if options.target.engine != "onnx":
        raise BuildError(f"target {options.target.name} is built by the TensorRT builder, not here.")
    staging, report = build_cpu(checkpoint, options, steps)
    steps.console.print(format_report(report))
    if not report.passed:
        rejected = options.out.parent / f"{options.out.name}.rejected"
        if rejected.exists():
            shutil.rmtree(rejected)
        staging.rename(rejected)
        steps.done(f"parity FAILED: nothing at {options.out} was changed; the rejected build is in {rejected}")
        return 1
    publish(staging, options.out)
    steps.done(f"artifact ready: {options.out}")
    return 0
