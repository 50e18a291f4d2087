"""Target cpu: an fp32, int8 or bf16 ONNX graph for ONNX Runtime / OpenVINO, judged on every runtime that
can run it here, the fastest that passes kept.

What differs by precision is data (ettin_export.targets.CPU_PRECISIONS): its runtimes, its bounds, the
CPU features it needs to run natively, and how it turns the exported fp32 graph into its own
(`Precision.graph_maker`: int8 quantizes; fp32 and bf16 keep the fp32 graph)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import shutil
import time
from pathlib import Path

from ettin_runtime.artifact import DEFAULT_MAX_BATCH_PAIRS, DEFAULT_MAX_BATCH_TOKENS, Artifact, Engine, Limits
from ettin_runtime.machine import ort_cpu_session
from ettin_runtime.packing import PairEncoder

from ettin_export.build.common import (
    BuildOptions,
    copy_tokenizer_files,
    finish_artifact,
    new_artifact,
    onnx_engine,
    reference_model,
)
from ettin_export.checkpoint import Checkpoint
from ettin_export.errors import BuildError
from ettin_export.parity import ParityReport
from ettin_export.progress import Steps
from ettin_export.staging import StagedFolder

RUNTIME_TIMING_PAIRS = 128  # traffic-shaped pairs each candidate runtime is timed on
RUNTIME_TIMING_RUNS = 5  # interleaved rounds; the median decides
AGAINST_FP32_PAIRS, AGAINST_FP32_RUNS = 64, 3  # a reduced precision timed beside fp32: a smaller check
FP32_TIMING_FILE = "fp32-timing.onnx"  # the fp32 graph, beside a reduced artifact's own only while it is timed


def _importable(runtime: str) -> bool:
    return importlib.util.find_spec(runtime) is not None  # a runtime's key is its module's name


def runtime_candidates(precision, requested: str | None) -> list[str]:
    """The runtimes the build may choose from for this precision, installed here (or the one asked for)."""
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
    return time_systems({name: (artifact, name) for name in candidates}, pairs, steps,
                        f"timing {' and '.join(candidates)}")


def time_systems(systems: dict[str, tuple[Artifact, str]], pairs, steps: Steps, title: str,
                 rounds: int = RUNTIME_TIMING_RUNS) -> dict[str, float]:
    """pairs/s of each (artifact, runtime) on the same pairs, in interleaved rounds after a warm-up, median."""
    import statistics

    sample = list(pairs)
    first = next(iter(systems.values()))[0]
    tokens = sum(len(ids) for ids in PairEncoder.from_dir(first.root, first.max_length).encode(sample))
    runtimes = {name: artifact.load(runtime=runtime, device="cpu") for name, (artifact, runtime) in systems.items()}
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    try:
        with steps.step(f"{title} on {len(sample)} pairs ({tokens} tokens)"):
            for runtime in runtimes.values():
                runtime.predict(sample)  # warm-up
            for _ in range(rounds):
                for name, runtime in runtimes.items():
                    start = time.perf_counter()
                    runtime.predict(sample)
                    seconds[name].append(time.perf_counter() - start)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    speeds = {name: round(len(sample) / statistics.median(times), 2) for name, times in seconds.items()}
    steps.note(", ".join(f"{name} {speed:g} pairs/s" for name, speed in speeds.items()))
    return speeds


def against_fp32(artifact: Artifact, fp32_graph: Path, options, parity_pairs, steps: Steps) -> dict:
    """A reduced precision's artifact timed beside the fp32 graph it came from (under each runtime fp32 can
    use here) on the same traffic pairs, on this machine: whether it is any faster here (int8 on a CPU
    without VNNI may not be). Said in the build's output; the caller records it in the manifest."""
    from ettin_export.targets import CPU_PRECISIONS

    if Path(str(fp32_graph) + ".data").is_file():
        return {"timed": False, "why": "the fp32 graph has external weights (over 2 GiB): not copied to time it"}
    timing = artifact.root / FP32_TIMING_FILE
    shutil.copyfile(fp32_graph, timing)
    try:
        fp32 = artifact.replace(engine=onnx_engine(timing, None), precision="fp32")
        sample, traffic = traffic_pairs(artifact, options.traffic, parity_pairs)
        sample = sample[:AGAINST_FP32_PAIRS]
        own = f"{artifact.precision} ({artifact.engine.runtime})"
        systems = {own: (artifact, artifact.engine.runtime)}
        systems.update({f"fp32 ({name})": (fp32, name) for name in runtime_candidates(CPU_PRECISIONS["fp32"], None)})
        speeds = time_systems(systems, sample, steps, f"timing {artifact.precision} against fp32", AGAINST_FP32_RUNS)
    finally:
        timing.unlink(missing_ok=True)
    best = max((name for name in speeds if name != own), key=lambda name: speeds[name])
    ratio = round(speeds[own] / speeds[best], 3)
    steps.note(f"{own} runs {ratio:.2f}x the pairs/s of {best} on this machine")
    if ratio < 1.0:
        steps.note(f"{artifact.precision} is slower here than fp32, which is also exact: on this CPU --precision fp32 "
                   f"builds the faster artifact (docs/precisions.md, 'Is int8 worth it on your CPU?')")
    from ettin_runtime.machine import this_machine

    return {"timed": True, "pairs_per_s": speeds, "ratio_to_best_fp32": ratio, "best_fp32": best,
            "traffic": traffic, "timed_pairs": len(sample), "machine": this_machine()}


def _with_runtime(artifact: Artifact, engine: Engine, runtime: str, recipe: dict, choice: dict) -> Artifact:
    """The staged artifact naming `runtime`, with the recipe and how the runtime was chosen; written."""
    record = {"recipe": recipe, "runtime_choice": {**choice, "chosen": runtime}}
    if runtime != "onnxruntime":  # the engine records ONNX Runtime's version already (Engine.onnxruntime_version)
        record[f"{runtime}_version"] = importlib.import_module(runtime).__version__  # with its build id
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
            f"this one has neither ({describe(machine)}), so {' / '.join(precision.runtimes)} would compute in fp32 "
            f"(AVX2: the gate would judge fp32, not {precision.name}) or emulate it (AVX-512: measured ~30x slower than "
            f"fp32, an artifact not worth serving). Build it on such a CPU (AMD Zen 4 / Zen 5, Intel "
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

    The exported fp32 graph, turned into the precision's own by its graph maker where it has one (int8:
    ONNX Runtime's dynamic quantization of the linear layers; bf16 runs the fp32 graph under OpenVINO's
    bf16 compute). The runtime is the fastest of those that can run the precision here (timed on
    traffic-shaped pairs), unless --runtime names one. An int8 graph that fails its gate gets its most
    sensitive linear layers back in fp32, by measurement, until it passes (ettin_export.build.int8_fallback)."""
    import onnx
    import onnxruntime

    from ettin_export.graph.export import export_onnx
    from ettin_export.graph.validate import check_graph_contract, check_values
    from ettin_export.targets import CPU_PRECISIONS

    precision = CPU_PRECISIONS[options.target.precision_of(options.precision)]
    candidates = runtime_candidates(precision, options.runtime)  # before long work: a missing runtime stops here
    require_native(precision)  # and so does a precision this CPU would only emulate
    model, run = reference_model(checkpoint, options, steps)
    make_graph = precision.make_graph()
    fp32_dir = staging.path if make_graph is None else StagedFolder(options.out, "fp32").path
    try:
        with steps.step("exporting fp32 ONNX (VarlenAttention custom op + local function body)"):
            exported = export_onnx(model, fp32_dir / "model.onnx", "fp32")
        with steps.step(f"validating the graph: names, dynamic axes, values on {len(run.grid)} unseen shapes"):
            check_graph_contract(onnx.load(str(exported.path), load_external_data=False), model.config.num_layers)
            session = ort_cpu_session(onnxruntime, exported.path)
            worst = check_values(session, run.encoder, run.grid, run.grid_references)
            del session
        steps.note(f"max |Δ| ONNX Runtime vs the fp64 anchor on the validation grid: {worst:.2e}")
        recipe = precision.recipe_json
        graph = exported.path
        if make_graph is not None:
            graph = staging.path / "model.onnx"
            with steps.step(precision.graph_step):
                recipe.update(make_graph(exported.path, graph, model.config.num_layers))
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
        if options.target.bounds_for(precision.name).needs_lowp_reference:  # bf16: its ranks follow PyTorch's bf16
            with steps.step(f"own reference: the packed model in PyTorch {precision.name} on {len(run.pairs)} pairs"):
                run.lowp_references()
        artifact, report = _judge_runtimes(artifact, engine, candidates, recipe, choice, run, options, precision, steps)
        if precision.name == "int8" and not report.passed and options.int8_max_fp32_layers != 0:
            artifact, report = _int8_fallback(artifact, exported.path, graph, candidates, recipe, choice, run, options,
                                              precision, model, steps, report)
        if make_graph is not None and report.passed:
            record = artifact.engine.record
            choice = {k: v for k, v in record["runtime_choice"].items() if k != "chosen"}
            choice["against_fp32"] = against_fp32(artifact, exported.path, options, run.pairs, steps)
            artifact = _with_runtime(artifact, artifact.engine, artifact.engine.runtime, record["recipe"], choice)
    finally:
        if fp32_dir != staging.path:
            shutil.rmtree(fp32_dir, ignore_errors=True)
    finish_artifact(artifact, report)
    return report


def _judge_runtimes(artifact, engine, candidates, recipe, choice, run, options, precision, steps):
    """The fastest runtime that passes the gate: runtimes round differently (OpenVINO's fp32 kernels sit
    closer to the fp32 bound than ONNX Runtime's at 150m), so each is judged, in order of speed, and
    every verdict is kept (Reranker.load(runtime="auto") may re-choose among the passed ones on a CPU
    of another class); when none passes, the fastest one's report is the verdict."""
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
    return artifact, report


def _int8_fallback(artifact, fp32_graph, graph, candidates, recipe, choice, run, options, precision, model,
                   steps, report):
    """Keep the int8 graph's most sensitive linear layers in fp32, one more per try, until the gate passes."""
    import onnx

    from ettin_export.build import int8_fallback as fallback
    from ettin_export.graph.quantize import linear_nodes
    from ettin_runtime.artifact import hash_files

    body = linear_nodes(onnx.load(str(fp32_graph), load_external_data=False))[:-2]
    limit = options.int8_max_fp32_layers
    limit = fallback.default_max_kept(len(body)) if limit is None else min(limit, len(body))
    steps.note(f"int8 failed its gate ({'; '.join(report.failures)}); finding which of the {len(body)} linear "
               f"layers it is sensitive to, to keep up to {limit} in fp32")
    probe_pairs, anchor, spans = fallback.probe_set(run.pairs, run.references.anchor, run.spans)
    bounds = options.target.bounds_for(precision.name)
    with steps.step(f"int8 sensitivity of {len(body)} linear layers on {len(probe_pairs)} of the pairs") as update:
        began = time.perf_counter()
        sensitivity, method = fallback.sensitivity(
            model, run.encoder, fp32_graph, graph, body, graph.parent, probe_pairs, anchor, spans, bounds,
            progress=lambda done, total: update(f"{steps.eta(done, total, time.perf_counter() - began)}"))
    order = fallback.fallback_order(sensitivity)[:limit]
    record = {"sensitivity": sensitivity, "sensitivity_method": method, "max_kept": limit, "tries": [
        {"kept_fp32": [], "passed": False, "failures": list(report.failures)}]}
    for count in range(1, len(order) + 1):
        keep = order[:count]
        with steps.step(f"int8 with {', '.join(keep)} in fp32"):
            made = precision.make_graph()(fp32_graph, graph, model.config.num_layers, keep_fp32=keep)
            tried = {**recipe, **made, "quantized": f"the backbone's linear layers but {len(keep)} kept in fp32"}
            external = graph.parent / (graph.name + ".data")
            engine = onnx_engine(graph, external if external.is_file() else None, runtime=candidates[0],
                                 record={"recipe": tried})
            artifact = artifact.replace(engine=engine, files=hash_files(graph.parent, list(artifact.files)))
            artifact, report = _judge_runtimes(artifact, engine, candidates, tried, choice, run, options, precision,
                                               steps)
        record["tries"].append({"kept_fp32": keep, "passed": report.passed, "failures": list(report.failures)})
        if report.passed:
            break
    if report.passed:
        steps.note(f"int8 passed with {', '.join(record['tries'][-1]['kept_fp32'])} in fp32")
    else:
        steps.note(f"int8 still fails with {len(order)} of {len(body)} linear layers kept in fp32 (at most {limit}: "
                   "--int8-max-fp32-layers N raises it)")
    final = dict(artifact.engine.record["recipe"])
    final["fallback"] = record
    artifact = _with_runtime(artifact, artifact.engine, artifact.engine.runtime, final,
                             artifact.engine.record["runtime_choice"])
    return artifact, report
