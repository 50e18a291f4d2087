"""Target h100: a bf16 ONNX graph -> a TensorRT engine whose attention layers are the project's AOT
plugin, judged on the GPU against the PyTorch flash-attention reference. The TensorRT- and GPU-specific
steps are `EngineHooks`, so the gate's logic is tested with injected stand-ins on a machine without either."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ettin_runtime.artifact import Artifact, Engine, Limits
from ettin_runtime.machine import ort_cpu_session

from ettin_export.build.common import BuildOptions, copy_tokenizer_files, finish_artifact, new_artifact, onnx_engine, reference_model
from ettin_export.checkpoint import Checkpoint
from ettin_export.parity import ParityReport, References
from ettin_export.parity.run import ReferenceRun
from ettin_export.progress import Steps
from ettin_export.staging import StagedFolder
from ettin_export.targets import Target


@dataclass
class EngineHooks:
    """The TensorRT/GPU steps of a `tensorrt` target. `default_engine_hooks()` fills them from
    ettin_export.engine.tensorrt; tests inject stand-ins to exercise the parity gate without TensorRT
    (labelled as such). A step a build does not reach may stay None (--onnx-only needs the profile alone)."""

    preflight: Callable[[Target], dict] | None = None  # fast environment check; raises with what is missing
    build_engine: Callable[..., dict] | None = None  # (onnx_path, plan_path, limits, target, timing_cache, steps) -> facts
    engine_profile: Callable[..., Limits] | None = None  # (max_batch_pairs, max_length, max_batch_tokens) -> Limits
    load_runtime: Callable[[Artifact], object] | None = None  # the staged artifact -> Reranker
    references: Callable[..., References] | None = None  # (checkpoint, pairs, encoder, anchor) -> fp64 + bf16 own error


def default_engine_hooks() -> EngineHooks:
    from ettin_export.engine import tensorrt
    from ettin_export.engine.rules import engine_profile

    return EngineHooks(preflight=tensorrt.preflight, build_engine=tensorrt.build_engine,
                       engine_profile=engine_profile, load_runtime=tensorrt.load_runtime)


def export_bf16_checked(model, run: ReferenceRun, directory: Path, steps: Steps):
    """The bf16-typed graph, its contract, and a numerical check of its arithmetic: widened to fp32
    (same graph, bf16 weights as fp32 values), it must match the fp64 anchor of the model whose weights
    are rounded to bf16, within the fp32 rule against CrossEncoder with the same rounded weights — a
    wrong cast or an fp32 island in the wrong place shows here."""
    import onnx
    import onnxruntime

    from ettin_export.graph.export import export_onnx
    from ettin_export.graph.validate import bf16_as_fp32, check_graph_contract, check_values
    from ettin_export.parity.references import fp32_references

    num_layers = model.config.num_layers
    with steps.step("exporting bf16 ONNX (VarlenAttention nodes carry plugin_namespace + aot=1)"):
        exported = export_onnx(model, directory / "model.onnx", "bf16")
    with steps.step("checking the bf16 graph: contract, and its arithmetic widened to fp32 in ONNX Runtime"):
        proto = onnx.load(str(exported.path), load_external_data=False)
        check_graph_contract(proto, num_layers)
        widened = bf16_as_fp32(proto, exported.path.parent)
        session = ort_cpu_session(onnxruntime, widened.SerializeToString())
        grid_pairs = [pair for batch in run.grid for pair in batch]
        rounded = fp32_references(run.checkpoint, grid_pairs, run.encoder, run.device, bf16_weights=True,
                                  crossencoder=run.crossencoder)
        worst = check_values(session, run.encoder, run.grid, rounded, what="ONNX Runtime (bf16 graph widened to fp32)")
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


def build_tensorrt(checkpoint: Checkpoint, options: BuildOptions, steps: Steps, hooks: EngineHooks,
                   staging: StagedFolder) -> ParityReport | None:
    """The bf16 engine, written into `staging`; returns the parity report (None with --onnx-only)."""
    target = options.target
    # The profile first: a bad --max-batch-* stops the build before the model is even built.
    limits = hooks.engine_profile(
        max_batch_pairs=options.max_batch_pairs or target.default_max_batch_pairs,
        max_length=options.max_length, max_batch_tokens=options.max_batch_tokens,
    )
    model, run = reference_model(checkpoint, options, steps)
    work = StagedFolder(options.out, "onnx") if not options.onnx_only else staging
    try:
        exported = export_bf16_checked(model, run, work.path, steps)
        del model  # the export cast it to bf16 in place; the GPU references are built afresh
        copy_tokenizer_files(checkpoint, staging.path)
        if options.onnx_only:
            engine = onnx_engine(exported.path, exported.external_data, complete=False,
                                 finish_command=finish_command(options))
            new_artifact(checkpoint, options, staging.path, engine=engine, limits=limits).write()
            return None
        plan = staging.path / "model.plan"
        facts = hooks.build_engine(
            onnx_path=exported.path, plan_path=plan, limits=limits, target=target,
            timing_cache=options.out.parent / f"{options.out.name}.timing.cache", steps=steps,
        )
    finally:
        if work is not staging:
            work.discard()
    engine = Engine.from_json({"format": "tensorrt", "file": plan.name, "runtime": "tensorrt", **facts})
    artifact = new_artifact(checkpoint, options, staging.path, engine=engine, limits=limits)
    artifact.write()
    with steps.step(f"parity on the GPU ({len(run.pairs)} pairs, {len(run.groups)} queries)"):
        runtime = hooks.load_runtime(artifact)
        candidate = runtime.predict(run.pairs)
        report = run.judge(target, f"tensorrt bf16 ({engine.tensorrt.gpu_name or 'GPU'})", candidate, hooks.references)
        runtime.close()
    finish_artifact(artifact, report)
    return report

