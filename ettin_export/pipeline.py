"""The build pipeline: checkpoint -> packed model -> ONNX graph -> engine -> artifact, judged on parity.

    run_build(load_checkpoint, BuildOptions(out=..., target=...))   # 0 built, 1 parity failed

The artifact is assembled in a staging folder beside --out (StagedFolder) and moved into place only
after parity passes, so an existing good artifact is never lost to a failed or interrupted build; a
build that fails parity is kept at OUT.rejected.

Targets (ettin_export.targets): `cpu` writes an fp32 / int8 / bf16 ONNX graph for ONNX Runtime or
OpenVINO (ettin_export.build.cpu); `h100` writes a bf16 TensorRT engine whose attention layers are the
project's AOT plugin, checked against the PyTorch flash-attention reference on the GPU
(ettin_export.build.tensorrt, its TensorRT/GPU steps behind `EngineHooks`). What they share is
ettin_export.build.common.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ettin_runtime.artifact import is_artifact

from ettin_export.build.common import BuildOptions
from ettin_export.build.cpu import build_cpu
from ettin_export.build.tensorrt import EngineHooks, build_tensorrt, default_engine_hooks, finish_command
from ettin_export.checkpoint import Checkpoint
from ettin_export.errors import BuildError
from ettin_export.parity import ParityReport, format_report, read_parity_file
from ettin_export.progress import Steps
from ettin_export.staging import StagedFolder, replacement_problem, unwritable_problem

__all__ = ["BuildError", "BuildOptions", "EngineHooks", "run_build"]


# --- before any work -------------------------------------------------------------------------------


def prepare_output(out: Path, force: bool) -> None:
    """Refuse to overwrite unless asked, never touch a folder that is not ours, and refuse a place that
    cannot be written before any work."""
    problem = unwritable_problem(out, "--out") or replacement_problem(
        out, force=force, ours=is_artifact, option="--out", foreign="is not an ettin-export artifact",
        holds="an artifact", keeps=" (the old one stays in place until the new one has passed parity)")
    if problem:
        raise BuildError(problem)


def check_limits(options: BuildOptions) -> None:
    """The batch limits against the max length, before any long work: a run must hold one full-length
    pair, and at least one pair."""
    from ettin_runtime.checks import whole_number as positive

    if options.max_batch_pairs is not None and not positive(options.max_batch_pairs):
        raise BuildError(f"--max-batch-size must be an integer of at least 1 (pairs per run); got "
                         f"{options.max_batch_pairs!r}. Leave it out for the target's default.")
    if options.max_batch_tokens is not None and not (positive(options.max_batch_tokens)
                                                     and options.max_batch_tokens >= options.max_length):
        raise BuildError(f"--max-batch-tokens {options.max_batch_tokens!r} is below the max length {options.max_length}: "
                         "one full-length pair would not fit in a run. Pass at least that, or leave it out.")
    if options.int8_max_fp32_layers is not None and not positive(options.int8_max_fp32_layers, minimum=0):
        raise BuildError(f"--int8-max-fp32-layers must be a whole number of at least 0; got "
                         f"{options.int8_max_fp32_layers!r}.")
    if options.parity_queries is not None and not positive(options.parity_queries):
        raise BuildError(f"--parity-queries must be an integer of at least 1; got {options.parity_queries!r}.")


def failure_advice(report: ParityReport, options: BuildOptions) -> str:
    """What a failed gate means: for fp32 and the GPU's bf16 a bug (the bound scales with what rounding
    does to this checkpoint); for the CPU's int8 / bf16 a ranking changed beyond the rank gates, which
    checkpoints with small score margins (random weights above all) do."""
    if report.precision in ("int8", "bf16") and options.target.engine == "onnx":
        return (f"{report.precision} moved this checkpoint's ranking beyond the rank gates. Random weights do that "
                "(their scores have no margins: near-ties everywhere); a trained reranker on pairs like its traffic "
                "usually does not. Gate on your own pairs with --parity-pairs FILE, or build --precision fp32 "
                "(exact).")
    return ("The bound already scales with what rounding does to this checkpoint, so a healthy checkpoint that "
            "fails here is a bug: please report it with that parity.json.")


def run_build(checkpoint_loader, options: BuildOptions, hooks: EngineHooks | None = None) -> int:
    """The whole command: returns the exit status (0 built, 1 parity failed; BuildError when refused)."""
    target = options.target
    if target.engine == "tensorrt" and not options.onnx_only:
        # Before any long work: a missing TensorRT or the wrong GPU stops the build within seconds.
        hooks = hooks or default_engine_hooks()
        facts = hooks.preflight(target)
    prepare_output(options.out, options.force)
    if options.parity_pairs and options.parity_pairs != "-":
        read_parity_file(options.parity_pairs)  # a bad file is named now, not after the model is built
    if target.engine == "onnx":
        from ettin_export.synthetic.lengths import PROFILES, read_pairs_file

        if options.traffic not in PROFILES:
            read_pairs_file(options.traffic)  # likewise (a missing or malformed file is a clear error)
    steps = Steps(f"ettin-export build --target {target.name} -> {options.out}", quiet=options.quiet)
    if target.engine == "tensorrt" and not options.onnx_only:
        steps.note(", ".join(f"{k}: {v}" for k, v in facts.items()))
    with steps.step("loading the checkpoint"):
        checkpoint: Checkpoint = checkpoint_loader()
    # One max-length rule: --max-length, else the checkpoint's own (CrossEncoder's) rule.
    options = dataclasses.replace(options, max_length=checkpoint.resolve_max_length(options.max_length))
    check_limits(options)
    steps.note(
        f"{checkpoint.source} ({checkpoint.layout}; {checkpoint.config.num_layers} layers, hidden "
        f"{checkpoint.config.hidden_size}; max length {options.max_length}; random weights: "
        f"{'yes' if checkpoint.random_weights else 'no'})"
    )
    staging = StagedFolder(options.out)
    for stale in staging.removed_stale:
        steps.note(f"removed {stale.name}, left by a build whose process is gone")
    try:
        if target.engine == "onnx":
            report = build_cpu(checkpoint, options, steps, staging)
        else:
            if options.onnx_only:
                from ettin_export.engine.rules import engine_profile

                hooks = hooks or EngineHooks(engine_profile=engine_profile)
            report = build_tensorrt(checkpoint, options, steps, hooks, staging)
    except BaseException:
        staging.discard()
        raise
    if report is None:  # --onnx-only
        staging.publish()
        steps.done(f"bf16 ONNX written to {options.out} (no engine yet)")
        steps.console.print(
            "To finish on a machine with TensorRT >= 10.9 and an H100/H200, copy nothing: run\n"
            f"    {finish_command(options)}"
        )
        return 0
    steps.console.print(format_report(report))
    if not report.passed:
        rejected = staging.reject()
        steps.done(f"parity FAILED: nothing at {options.out} was changed; the rejected build is in {rejected}")
        steps.console.print(
            f"Its parity.json holds the whole report. To see it on your own pairs: ettin-export verify {rejected} "
            "--allow-unverified --pairs YOUR_PAIRS.jsonl. " + failure_advice(report, options)
        )
        return 1
    staging.publish()
    steps.done(f"artifact ready: {options.out}")
    return 0

