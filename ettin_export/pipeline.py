"""The build pipeline: checkpoint -> packed model -> ONNX graph -> engine -> artifact, judged on parity.

    run_build(load_checkpoint, BuildOptions(out=..., target=...))   # 0 built, 1 parity failed

The artifact is assembled in a staging folder beside --out (ettin_runtime.artifact.StagedFolder) and
moved into place only after parity passes, so an existing good artifact is never lost to a failed or
interrupted build; a build that fails parity is kept at OUT.rejected.

Targets (ettin_export.targets): `cpu` writes an fp32 ONNX graph for ONNX Runtime; `h100` writes a bf16
TensorRT engine whose attention layers are the project's AOT plugin, checked against the PyTorch
flash-attention reference on the GPU. The TensorRT- and GPU-specific steps are behind `EngineHooks`,
so the gate's logic can be tested with injected runners on a machine without either.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ettin_runtime.artifact import (
    DEFAULT_MAX_BATCH_PAIRS,
    DEFAULT_MAX_BATCH_TOKENS,
    MANIFEST_NAME,
    PARITY_NAME,
    TOKENIZER_FILES,
    Artifact,
    Engine,
    Limits,
    ModelFacts,
    ParitySummary,
    Source,
    StagedFolder,
    hash_files,
    is_artifact,
    replacement_problem,
    unwritable_problem,
)
from ettin_runtime.packing import PairEncoder

from ettin_export import __version__
from ettin_export.checkpoint import Checkpoint
from ettin_export.errors import BuildError
from ettin_export.parity import ParityReport, References, builtin_parity_set, format_report, read_parity_file
from ettin_export.parity.references import ReferenceMismatch
from ettin_export.parity.run import ReferenceRun, reference_run
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
    precision: str | None = None  # None: the target's (cpu: fp32; also int8, bf16)
    runtime: str | None = None  # None: the fastest of the precision's runtimes installed here
    traffic: str = "nq-like"  # the pairs runtimes are timed on: a length profile or a JSON-lines pairs file
    quiet: bool = False
    command_line: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class EngineHooks:
    """The TensorRT/GPU steps of a `tensorrt` target. Defaults come from ettin_export.engine.tensorrt;
    tests inject stand-ins to exercise the parity gate without TensorRT (labelled as such)."""

    preflight: Callable[[Target], dict]  # fast environment check; raises with what is missing
    build_engine: Callable[..., dict]  # (onnx_path, plan_path, limits, target, timing_cache, steps) -> engine facts
    engine_profile: Callable[..., Limits]  # (max_batch_pairs, max_length, max_batch_tokens) -> Limits with profile
    load_runtime: Callable[[Artifact], object]  # the staged artifact -> Reranker
    references: Callable[..., References]  # (checkpoint, pairs, encoder, anchor) -> fp64 anchor + bf16 own error


def default_engine_hooks() -> EngineHooks:
    from ettin_export.engine import tensorrt

    return EngineHooks(preflight=tensorrt.preflight, build_engine=tensorrt.build_engine,
                       engine_profile=tensorrt.engine_profile, load_runtime=tensorrt.load_runtime, references=None)


# --- the output folder --------------------------------------------------------------------------


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
    def positive(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if options.max_batch_pairs is not None and not positive(options.max_batch_pairs):
        raise BuildError(f"--max-batch-size must be an integer of at least 1 (pairs per run); got "
                         f"{options.max_batch_pairs!r}. Leave it out for the target's default.")
    if options.max_batch_tokens is not None and not (positive(options.max_batch_tokens)
                                                     and options.max_batch_tokens >= options.max_length):
        raise BuildError(f"--max-batch-tokens {options.max_batch_tokens!r} is below the max length {options.max_length}: "
                         "one full-length pair would not fit in a run. Pass at least that, or leave it out.")
    if options.parity_queries is not None and not positive(options.parity_queries):
        raise BuildError(f"--parity-queries must be an integer of at least 1; got {options.parity_queries!r}.")


# --- shared steps --------------------------------------------------------------------------------


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


# --- target cpu: fp32, int8 or bf16 ONNX for ONNX Runtime / OpenVINO ---------------------------------


RUNTIME_TIMING_PAIRS = 128  # traffic-shaped pairs each candidate runtime is timed on
RUNTIME_TIMING_RUNS = 5  # interleaved rounds; the median decides


def _importable(runtime: str) -> bool:
    import importlib.util

    module = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}[runtime]
    return importlib.util.find_spec(module) is not None


def runtime_candidates(precision, requested: str | None) -> list[str]:
    """The runtimes the build may choose from for this precision, installed here (or the one asked for)."""
    from ettin_export.targets import CPU_PRECISIONS  # noqa: F401  (precision is one of them)

    if requested is not None:
        if requested not in precision.runtimes:
            raise BuildError(f"--runtime {requested} cannot run {precision.name} artifacts; choose one of "
                             f"{', '.join(precision.runtimes)}.")
        if not _importable(requested):
            raise BuildError(f"--runtime {requested} is not installed here: pip install 'ettin-export[{requested}]'.")
        return [requested]
    installed = [r for r in precision.runtimes if _importable(r)]
    if not installed:
        raise BuildError(f"{precision.name} artifacts run on {' or '.join(precision.runtimes)}, none of which is "
                         f"installed here: pip install 'ettin-export[{precision.runtimes[0]}]'.")
    return installed


def traffic_pairs(artifact: Artifact, traffic: str, fallback) -> tuple[list[tuple[str, str]], str]:
    """The pairs the runtimes are timed on: RUNTIME_TIMING_PAIRS of a length profile (nq-like by default,
    text of exact token counts under the artifact's tokenizer) or of the user's pairs file. A tokenizer
    whose vocabulary cannot spell the profile's exact counts (a foreign one without short word tokens)
    gets the first pairs of `fallback` (the parity set), and the record says so."""
    from ettin_export.synthetic.lengths import PROFILES, load_pairs

    encoder = PairEncoder.from_dir(artifact.root, artifact.max_length)
    try:
        pairs, _ = load_pairs(traffic, encoder._tokenizer, RUNTIME_TIMING_PAIRS, seed=0)
    except ValueError:
        if traffic not in PROFILES:
            raise  # the user's file: its own error
        return list(fallback[:RUNTIME_TIMING_PAIRS]), f"parity set (this tokenizer cannot spell the {traffic} profile)"
    return pairs[:RUNTIME_TIMING_PAIRS], traffic if traffic in PROFILES else f"file {Path(traffic).name}"


def time_runtimes(artifact: Artifact, candidates: list[str], pairs, steps: Steps) -> dict[str, float]:
    """pairs/s of each candidate runtime on the same pairs, in interleaved rounds, median."""
    import statistics
    import time

    sample = list(pairs)
    tokens = sum(len(ids) for ids in PairEncoder.from_dir(artifact.root, artifact.max_length).encode(sample))
    runtimes = {name: artifact.load(runtime=name, device="cpu") for name in candidates}
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    with steps.step(f"timing {' and '.join(candidates)} on {len(sample)} pairs ({tokens} tokens)"):
        for runtime in runtimes.values():
            runtime.predict(sample)  # warm-up
        for _ in range(RUNTIME_TIMING_RUNS):
            for name, runtime in runtimes.items():
                start = time.perf_counter()
                runtime.predict(sample)
                seconds[name].append(time.perf_counter() - start)
    for runtime in runtimes.values():
        runtime.close()
    speeds = {name: round(len(sample) / statistics.median(times), 2) for name, times in seconds.items()}
    steps.note(", ".join(f"{name} {speed:g} pairs/s" for name, speed in speeds.items()))
    return speeds


def _with_runtime(artifact: Artifact, engine: Engine, runtime: str, recipe: dict, choice: dict) -> Artifact:
    """The staged artifact naming `runtime`, with the recipe and how the runtime was chosen; written."""
    record = {"recipe": recipe, "runtime_choice": {**choice, "chosen": runtime}}
    if runtime == "openvino":
        import openvino

        record["openvino_version"] = openvino.__version__
    artifact = artifact.replace(engine=dataclasses.replace(engine, runtime=runtime, record=record))
    artifact.write()
    return artifact


def require_native(precision) -> None:
    """Refuse a precision this CPU would only emulate: its gate would judge fp32 numerics and the artifact
    would then run, on a CPU that has the precision, numerics no gate saw."""
    from ettin_runtime.machine import describe, this_machine

    machine = this_machine()
    if not precision.runs_natively(machine["features"]):
        raise BuildError(
            f"--precision {precision.name} needs a CPU with {' or '.join(f.upper() for f in precision.native_features)}; "
            f"this one has neither ({describe(machine)}), so {' / '.join(precision.runtimes)} would compute in fp32 and "
            f"the parity gate would judge fp32, not {precision.name}. Build it on such a CPU (AMD Zen 4 / Zen 5, Intel "
            f"Sapphire Rapids or newer; `grep -o 'avx512_bf16\\|amx_bf16' /proc/cpuinfo` shows it), or build "
            "--precision fp32 or int8 here."
        )


def record_machine(report: ParityReport, runtime, runtime_name: str) -> ParityReport:
    """Record in `report` what the gate ran on: this CPU (model, features, class) and the precision the
    runtime computed in; a gate that did not compute the artifact's precision fails."""
    from ettin_runtime.machine import this_machine

    computed = getattr(runtime, "computed_precision", report.precision)
    report.judged_on = {**this_machine(), "runtime": runtime_name, "precision_computed": computed}
    if computed != report.precision:
        report.failures.append(
            f"the gate ran at {computed}, not {report.precision}: {runtime_name} does not compute {report.precision} "
            "on this CPU, so the scores judged are not those the artifact gives where it does")
    return report


def build_cpu(checkpoint: Checkpoint, options: BuildOptions, steps: Steps, staging: StagedFolder) -> ParityReport:
    """The CPU artifact at the asked precision, written into `staging`; returns the parity report.

    fp32: the exported graph. int8: that graph with ONNX Runtime's dynamic quantization of the linear
    layers (graph.quantize). bf16: the fp32 graph for OpenVINO's bf16 compute. The runtime is the
    fastest of those that can run the precision here (timed on a sample), unless --runtime names one."""
    import onnx
    import onnxruntime

    from ettin_export.graph.export import export_onnx
    from ettin_export.graph.validate import check_graph_contract, check_values
    from ettin_export.targets import CPU_PRECISIONS

    precision = CPU_PRECISIONS[options.target.precision_of(options.precision)]
    candidates = runtime_candidates(precision, options.runtime)  # before long work: a missing runtime stops here
    require_native(precision)  # and so does a precision this CPU would only emulate
    model, run = reference_model(checkpoint, options, steps)
    fp32_dir = staging.path if precision.name != "int8" else StagedFolder(options.out, "fp32").path
    try:
        with steps.step("exporting fp32 ONNX (VarlenAttention custom op + local function body)"):
            exported = export_onnx(model, fp32_dir / "model.onnx", "fp32")
        with steps.step(f"validating the graph: names, dynamic axes, values on {len(run.grid)} unseen shapes"):
            check_graph_contract(onnx.load(str(exported.path), load_external_data=False), model.config.num_layers)
            session = onnxruntime.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
            worst = check_values(session, run.encoder, run.grid, run.grid_references)
            del session
        steps.note(f"max |Δ| ONNX Runtime vs the fp64 anchor on the validation grid: {worst:.2e}")
        recipe = precision.recipe_json
        graph = exported.path
        if precision.name == "int8":
            from ettin_export.graph.quantize import quantize_int8, quantized_nodes

            with steps.step("quantizing the linear layers to int8 (ONNX Runtime dynamic, per channel, head in fp32)"):
                recipe.update(quantize_int8(exported.path, staging.path / "model.onnx"))
                graph = staging.path / "model.onnx"
                quantized = onnx.load(str(graph), load_external_data=False)
                check_graph_contract(quantized, model.config.num_layers)  # the op, its body and the I/O survive
                recipe["nodes"] = quantized_nodes(quantized)
                del quantized
    finally:
        if fp32_dir != staging.path:
            shutil.rmtree(fp32_dir, ignore_errors=True)
    copy_tokenizer_files(checkpoint, staging.path)
    limits = Limits(options.max_batch_pairs or DEFAULT_MAX_BATCH_PAIRS,
                    options.max_batch_tokens or max(DEFAULT_MAX_BATCH_TOKENS, options.max_length))
    external = staging.path / (graph.name + ".data")
    engine = onnx_engine(graph, external if external.is_file() else None, runtime=candidates[0],
                         record={"recipe": recipe})
    artifact = new_artifact(checkpoint, options, staging.path, engine=engine, limits=limits, precision=precision.name)
    choice = {"candidates": candidates, "by": "--runtime" if options.runtime else "the only one installed"}
    if len(candidates) > 1:
        from ettin_runtime.machine import this_machine

        sample, traffic = traffic_pairs(artifact, options.traffic, run.pairs)
        choice.update(pairs_per_s=time_runtimes(artifact, candidates, sample, steps), by="timed on this machine",
                      traffic=traffic, timed_pairs=len(sample), machine=this_machine())
        candidates = sorted(candidates, key=lambda name: -choice["pairs_per_s"][name])
    # The fastest runtime that passes the gate: runtimes round differently (OpenVINO's fp32 kernels sit
    # closer to the fp32 bound than ONNX Runtime's at 150m), so each is judged, in order of speed, and
    # every verdict is kept (Reranker.load(runtime="auto") may re-choose among the passed ones on a CPU
    # of another class); when none passes, the fastest one's report is the verdict.
    verdicts: dict[str, str] = {}
    judged = []
    for runtime_name in candidates:
        artifact = _with_runtime(artifact, engine, runtime_name, recipe, {**choice, "gate": dict(verdicts)})
        with steps.step(f"parity on the {'given' if options.parity_pairs else 'built-in'} set ({len(run.pairs)} pairs, "
                        f"{len(run.groups)} queries, {runtime_name})"):
            runtime = artifact.load(device="cpu")
            report = run.judge(options.target, f"{runtime_name} {precision.name} (CPU)", runtime.predict(run.pairs),
                               precision=precision.name)
            record_machine(report, runtime, runtime_name)
            runtime.close()
        verdicts[runtime_name] = "passed" if report.passed else "; ".join(report.failures)
        judged.append((runtime_name, report))
        if not report.passed and runtime_name != candidates[-1]:
            steps.note(f"{runtime_name} failed the gate ({verdicts[runtime_name]}); judging the next runtime")
    runtime_name, report = next(((name, r) for name, r in judged if r.passed), judged[0])
    artifact = _with_runtime(artifact, engine, runtime_name, recipe, {**choice, "gate": dict(verdicts)})
    finish_artifact(artifact, report)
    return report


# --- target h100: bf16 ONNX -> TensorRT engine -----------------------------------------------------


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
        session = onnxruntime.InferenceSession(widened.SerializeToString(), providers=["CPUExecutionProvider"])
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


# --- the command ----------------------------------------------------------------------------------


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
                from ettin_export.engine.tensorrt import engine_profile

                hooks = hooks or EngineHooks(None, None, engine_profile, None, None)
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
