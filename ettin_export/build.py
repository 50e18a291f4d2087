"""`ettin-export build`: checkpoint -> packed model -> ONNX -> session/engine -> parity -> artifact.

The artifact is assembled in a staging folder beside --out and moved into place only after parity
passes, so an existing good artifact is never lost to a failed or interrupted build.

Targets (ettin_export.targets): `cpu` writes an fp32 ONNX graph for ONNX Runtime; `h100` writes a bf16
TensorRT engine whose attention layers are the project's AOT plugin, checked against the PyTorch
flash-attention reference on the GPU. The TensorRT- and GPU-specific steps are behind `EngineHooks`,
so the gate's logic can be tested with injected runners on a machine without either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ettin_runtime.manifest import MANIFEST_NAME, Manifest, hash_files

from . import __version__
from .checkpoint import Checkpoint
from .parity import ParityReport, References, builtin_parity_set, flatten, format_report, judge
from .progress import Steps
from .targets import Target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PARITY_FILE = "parity.json"


class BuildError(RuntimeError):
    """The build stopped; the message says why and what to do. Nothing at --out was changed."""


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
    quiet: bool = False
    command_line: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class EngineHooks:
    """The TensorRT/GPU steps of a `tensorrt` target. Defaults come from ettin_export.tensorrt_build;
    tests inject stand-ins to exercise the parity gate without TensorRT (labelled as such)."""

    preflight: Callable[[Target], dict]  # fast environment check; raises with what is missing
    build_engine: Callable[..., dict]  # (onnx_path, plan_path, profile, target, timing_cache, steps) -> engine facts
    engine_profile: Callable[..., dict]  # (max_batch_pairs, max_length, max_batch_tokens) -> limits incl. profile
    load_runtime: Callable[[Path, Manifest], object]  # (artifact dir, manifest) -> Reranker
    references: Callable[..., References]  # (checkpoint, pairs, encoder, anchor) -> fp64 anchor + bf16 own error


def default_engine_hooks() -> EngineHooks:
    from . import tensorrt_build

    return EngineHooks(
        preflight=tensorrt_build.preflight,
        build_engine=tensorrt_build.build_engine,
        engine_profile=tensorrt_build.engine_profile,
        load_runtime=tensorrt_build.load_runtime,
        references=gpu_references,
    )


def gpu_references(checkpoint: Checkpoint, pairs, encoder, anchor: tuple | None = None) -> References:
    from .reference import bf16_references

    return bf16_references(checkpoint, pairs, encoder, "cuda", anchor)


# --- the output folder --------------------------------------------------------------------------


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


def staging_dir(out: Path, kind: str = "building") -> Path:
    staging = out.parent / f".{out.name}.{kind}-{os.getpid()}"
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


def reject(staging: Path, out: Path) -> Path:
    """Keep a build that failed parity beside --out for inspection; --out itself is untouched."""
    rejected = out.parent / f"{out.name}.rejected"
    if rejected.exists():
        shutil.rmtree(rejected)
    staging.rename(rejected)
    return rejected


# --- shared steps --------------------------------------------------------------------------------


def default_parity_queries(checkpoint: Checkpoint, target: Target) -> int:
    """Ten queries (~600 pairs) where that is cheap; on a CPU, two (~120 pairs) for models of hidden
    size above 512, whose fp32 reference and ONNX Runtime passes over ten would take 10+ minutes on
    two cores. --parity-queries overrides."""
    if target.engine == "onnx" and checkpoint.config.hidden_size > 512:
        return 2
    return 10


@dataclass
class ReferenceModel:
    """What every exported path is compared with: the fp32 packed model (the export source), the
    built-in parity set with its references (fp64 anchor and CrossEncoder's own fp32 error), and the
    validation grid's batches with theirs."""

    model: object
    encoder: object
    groups: list
    pairs: list
    spans: list
    references: References
    grid: list  # validation batches (lists of pairs), one per VALIDATION_GRID shape
    grid_references: References
    device: str
    crossencoder: bool  # whether CrossEncoder is the own reference (not --skip-crossencoder-check)


def checked_reference_model(checkpoint: Checkpoint, options: BuildOptions, steps: Steps) -> ReferenceModel:
    """The fp32 model, the parity set and the validation grid with their references, and the check
    that the packed model computes what CrossEncoder computes (reference.check_port), before anything
    is exported."""
    from ettin_runtime.packing import PairEncoder

    from .reference import ReferenceMismatch, check_port_on_sample, fp32_references
    from .validate import validation_batches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with steps.step("building the packed PyTorch model (fp32)"):
        model = checkpoint.build_model(torch.float32)
        encoder = PairEncoder.from_dir(checkpoint.path, options.max_length)
        queries = options.parity_queries or default_parity_queries(checkpoint, options.target)
        groups = builtin_parity_set(seed=0, queries=queries)
        pairs, spans = flatten(groups)
        grid = validation_batches(encoder)
    grid_pairs = [pair for batch in grid for pair in batch]
    everything = pairs + grid_pairs
    with steps.step(f"reference runs on {len(everything)} pairs: the packed model in fp64, CrossEncoder in fp32"):
        references = fp32_references(checkpoint, everything, encoder, device, crossencoder=options.check_crossencoder)
    parity_refs = references.subset(np.arange(len(pairs)))
    grid_refs = references.subset(np.arange(len(pairs), len(everything)))
    if options.check_crossencoder:
        with steps.step("checking the packed model against CrossEncoder (the fp32 rule both ways)"):
            try:
                port = check_port_on_sample(checkpoint, pairs, parity_refs, encoder, device,
                                            model=model if device == "cpu" else None)
            except ReferenceMismatch as error:
                raise BuildError(str(error)) from error
        steps.note(f"packed model vs CrossEncoder {port.describe()}")
    return ReferenceModel(model, encoder, groups, pairs, spans, parity_refs, grid, grid_refs, device,
                          options.check_crossencoder)


def write_tokenizer_files(checkpoint: Checkpoint, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        source = checkpoint.path / name
        if source.is_file():
            shutil.copy2(source, directory / name)


def make_manifest(
    checkpoint: Checkpoint, options: BuildOptions, directory: Path, *, engine: dict, limits: dict,
    precision: str | None = None,
) -> Manifest:
    from .reference import weights_fingerprint

    config = checkpoint.config
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST_NAME, PARITY_FILE))
    return Manifest(
        source={
            "model": checkpoint.source, "revision": checkpoint.revision, "layout": checkpoint.layout,
            "size": checkpoint.size, "random_weights": checkpoint.random_weights,
            "weights_sha256": weights_fingerprint(checkpoint),
        },
        model={
            "hidden_size": config.hidden_size, "num_layers": config.num_layers, "num_heads": config.num_heads,
            "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
            "windows": list(config.windows), "pooling": config.head.pooling, "vocab_size": config.vocab_size,
        },
        score_activation=checkpoint.activation,
        max_length=options.max_length,
        target=options.target.name,
        precision=precision or options.target.precision,
        engine=engine,
        limits=limits,
        files=hash_files(directory, files),
        created_by=f"ettin-export {__version__}",
    )


def finish_artifact(staging: Path, manifest: Manifest, report: ParityReport) -> None:
    (staging / PARITY_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    manifest.parity = report.summary()
    manifest.write(staging)


def onnx_engine_facts(path: Path, external_data: Path | None) -> dict:
    import onnx
    import onnxruntime

    proto = onnx.load(str(path), load_external_data=False)
    return {
        "format": "onnx", "file": path.name, "external_data": external_data.name if external_data else None,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "onnxruntime_version": onnxruntime.__version__, "tensorrt_version": None,
        "compute_capability": None, "ptx_version": None,
    }


# --- target cpu: fp32 ONNX for ONNX Runtime ------------------------------------------------------


def build_cpu(checkpoint: Checkpoint, options: BuildOptions, steps: Steps) -> tuple[Path, ParityReport]:
    """fp32 ONNX for ONNX Runtime. Returns the staging folder and the parity report."""
    import onnx
    import onnxruntime

    from ettin_runtime.onnxruntime_backend import OnnxRuntimeReranker

    from .onnx_export import export_onnx
    from .validate import check_graph_contract, check_values

    ref = checked_reference_model(checkpoint, options, steps)
    staging = staging_dir(options.out)
    try:
        with steps.step("exporting fp32 ONNX (VarlenAttention custom op + local function body)"):
            exported = export_onnx(ref.model, staging / "model.onnx", "fp32")
        with steps.step(f"validating the graph: names, dynamic axes, values on {len(ref.grid)} unseen shapes"):
            check_graph_contract(onnx.load(str(exported.path), load_external_data=False), ref.model.config.num_layers)
            session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
            worst = check_values(session, ref.encoder, ref.grid, ref.grid_references)
            del session
        steps.note(f"max |Δ| ONNX Runtime vs the fp64 anchor on the validation grid: {worst:.2e}")
        write_tokenizer_files(checkpoint, staging)
        limits = {
            "max_batch_pairs": options.max_batch_pairs or 256,
            "max_batch_tokens": options.max_batch_tokens or max(16384, options.max_length),
        }
        manifest = make_manifest(
            checkpoint, options, staging, engine=onnx_engine_facts(exported.path, exported.external_data), limits=limits
        )
        manifest.write(staging)
        with steps.step(f"parity on the built-in set ({len(ref.pairs)} pairs, {len(ref.groups)} queries)"):
            runtime = OnnxRuntimeReranker.load(staging, manifest)
            report = judge(options.target, "onnxruntime fp32 (CPU)", runtime.predict(ref.pairs), ref.references,
                           ref.spans)
        finish_artifact(staging, manifest, report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, report


# --- target h100: bf16 ONNX -> TensorRT engine -----------------------------------------------------


def export_bf16_checked(checkpoint: Checkpoint, ref: ReferenceModel, directory: Path, steps: Steps):
    """The bf16-typed graph, its contract, and a numerical check of its arithmetic: widened to fp32
    (same graph, bf16 weights as fp32 values), it must match the fp64 anchor of the model whose weights
    are rounded to bf16, within the fp32 rule against CrossEncoder with the same rounded weights — a
    wrong cast or an fp32 island in the wrong place shows here."""
    import onnx
    import onnxruntime

    from .onnx_export import export_onnx
    from .reference import fp32_references
    from .validate import bf16_as_fp32, check_graph_contract, check_values

    num_layers = ref.model.config.num_layers
    with steps.step("exporting bf16 ONNX (VarlenAttention nodes carry plugin_namespace + aot=1)"):
        exported = export_onnx(ref.model, directory / "model.onnx", "bf16")
    with steps.step("checking the bf16 graph: contract, and its arithmetic widened to fp32 in ONNX Runtime"):
        proto = onnx.load(str(exported.path), load_external_data=False)
        check_graph_contract(proto, num_layers)
        widened = bf16_as_fp32(proto, exported.path.parent)
        session = onnxruntime.InferenceSession(widened.SerializeToString(), providers=["CPUExecutionProvider"])
        grid_pairs = [pair for batch in ref.grid for pair in batch]
        rounded = fp32_references(checkpoint, grid_pairs, ref.encoder, ref.device, bf16_weights=True,
                                  crossencoder=ref.crossencoder)
        worst = check_values(session, ref.encoder, ref.grid, rounded, what="ONNX Runtime (bf16 graph widened to fp32)")
        del session, widened
    steps.note(f"max |Δ| widened bf16 graph vs the fp64 anchor with bf16-rounded weights: {worst:.2e}")
    return exported


def finish_command(options: BuildOptions) -> str:
    """The user's own command line, minus --onnx-only: what to run on the GPU machine (with --force, so
    the same command also finishes the build where the ONNX-only artifact already sits at --out)."""
    argv = [a for a in options.command_line if a != "--onnx-only"]
    if argv and Path(argv[0]).name in ("ettin-export", "__main__.py", "cli.py"):
        argv = ["ettin-export", *argv[1:]]
    if argv and "--force" not in argv:
        argv.append("--force")
    return shlex.join(argv) if argv else "ettin-export build ... --target h100"


def build_tensorrt(
    checkpoint: Checkpoint, options: BuildOptions, steps: Steps, hooks: EngineHooks
) -> tuple[Path, ParityReport | None]:
    target = options.target
    # The profile first: a bad --max-batch-* stops the build before the model is even built.
    limits = hooks.engine_profile(
        max_batch_pairs=options.max_batch_pairs or target.default_max_batch_pairs,
        max_length=options.max_length, max_batch_tokens=options.max_batch_tokens,
    )
    ref = checked_reference_model(checkpoint, options, steps)
    staging = staging_dir(options.out)
    work = staging_dir(options.out, "onnx") if not options.onnx_only else staging
    try:
        exported = export_bf16_checked(checkpoint, ref, work, steps)
        ref.model = None  # the export cast it to bf16 in place; the GPU references are built afresh
        write_tokenizer_files(checkpoint, staging)
        if options.onnx_only:
            engine = {**onnx_engine_facts(exported.path, exported.external_data),
                      "complete": False, "finish_command": finish_command(options)}
            manifest = make_manifest(checkpoint, options, staging, engine=engine, limits=limits)
            manifest.write(staging)
            return staging, None
        timing_cache = options.out.parent / f"{options.out.name}.timing.cache"
        plan = staging / "model.plan"
        engine = hooks.build_engine(
            onnx_path=exported.path, plan_path=plan, limits=limits, target=target,
            timing_cache=timing_cache, steps=steps,
        )
        if work != staging:
            shutil.rmtree(work, ignore_errors=True)
        manifest = make_manifest(checkpoint, options, staging, engine={"format": "tensorrt", "file": plan.name, **engine},
                                 limits=limits)
        manifest.write(staging)
        with steps.step(f"parity on the GPU ({len(ref.pairs)} pairs, {len(ref.groups)} queries)"):
            runtime = hooks.load_runtime(staging, manifest)
            candidate = runtime.predict(ref.pairs)
            anchor = (ref.references.anchor, ref.references.anchor_name)
            references = hooks.references(checkpoint, ref.pairs, runtime.encoder, anchor)
            report = judge(target, f"tensorrt bf16 ({engine.get('gpu_name', 'GPU')})", candidate, references, ref.spans)
        finish_artifact(staging, manifest, report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if work != staging:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return staging, report


# --- the command ----------------------------------------------------------------------------------


def run_build(checkpoint_loader, options: BuildOptions, hooks: EngineHooks | None = None) -> int:
    """The whole command: returns the exit status (0 built, 1 parity failed; BuildError when refused)."""
    target = options.target
    if target.engine == "tensorrt" and not options.onnx_only:
        # Before any long work: a missing TensorRT or the wrong GPU stops the build within seconds.
        hooks = hooks or default_engine_hooks()
        facts = hooks.preflight(target)
    prepare_output(options.out, options.force)
    steps = Steps(f"ettin-export build --target {target.name} -> {options.out}", quiet=options.quiet)
    if target.engine == "tensorrt" and not options.onnx_only:
        steps.note(", ".join(f"{k}: {v}" for k, v in facts.items()))
    with steps.step("loading the checkpoint"):
        checkpoint: Checkpoint = checkpoint_loader()
    # One max-length rule: --max-length, else the checkpoint's own (CrossEncoder's) rule.
    options = dataclasses.replace(options, max_length=checkpoint.resolve_max_length(options.max_length))
    steps.note(
        f"{checkpoint.source} ({checkpoint.layout}; {checkpoint.config.num_layers} layers, hidden "
        f"{checkpoint.config.hidden_size}; max length {options.max_length}; random weights: "
        f"{'yes' if checkpoint.random_weights else 'no'})"
    )
    if target.engine == "onnx":
        staging, report = build_cpu(checkpoint, options, steps)
    else:
        if options.onnx_only:
            hooks = hooks or EngineHooks(None, None, _tensorrt_profile(), None, None)
        staging, report = build_tensorrt(checkpoint, options, steps, hooks)
    if report is None:  # --onnx-only
        publish(staging, options.out)
        steps.done(f"bf16 ONNX written to {options.out} (no engine yet)")
        steps.console.print(
            "To finish on a machine with TensorRT >= 10.9 and an H100/H200, copy nothing: run\n"
            f"    {finish_command(options)}"
        )
        return 0
    steps.console.print(format_report(report))
    if not report.passed:
        rejected = reject(staging, options.out)
        steps.done(f"parity FAILED: nothing at {options.out} was changed; the rejected build is in {rejected}")
        steps.console.print(
            f"Its parity.json holds the whole report. To see it on your own pairs: ettin-export verify {rejected} "
            "--pairs YOUR_PAIRS.jsonl. The bound already scales with what rounding does to this checkpoint, so a "
            "healthy checkpoint that fails here is a bug: please report it with that parity.json."
        )
        return 1
    publish(staging, options.out)
    steps.done(f"artifact ready: {options.out}")
    return 0


def _tensorrt_profile():
    from .tensorrt_build import engine_profile

    return engine_profile
