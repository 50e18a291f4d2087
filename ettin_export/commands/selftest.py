"""`ettin-export selftest --target h100`: on a machine with TensorRT and the GPU, prove an engine end to end.

One command, four checks, one verdict:

1. plugin layers  the parsed network had one plugin layer per VarlenAttention node (the build counts them
                  and stops otherwise; the count is in the manifest)
2. fresh process  a new Python process that imports plain TensorRT and never ettin_plugins (checked in its
                  sys.modules, and no 'ettin' creator in TensorRT's plugin registry) deserializes the plan and
                  runs it: the engine needs no Python at serve time. Its scores equal the runtime's.
3. kernel parity  the project's Triton kernel against the fp32 reference, beside PyTorch's own bf16 flash
                  attention on the same inputs, at awkward lengths: kernel <= 2 x PyTorch (flash-attention's rule)
4. engine parity  the build's gate: engine vs the fp32 packed model within 1.5 x the bf16 flash reference's
                  own error, plus the ranking bounds (the artifact's parity.json)

It builds a random-weights artifact (default 17m) in a temporary folder, or in --keep DIR. Exit status:
0 all four passed, 1 a check failed, 2 this machine cannot run it (the preflight's message says why).
Nothing heavy is imported until `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKS = ("plugin layers", "fresh process", "kernel parity", "engine parity")

FRESH_PROCESS_PAIRS = 12

# Runs in a fresh interpreter: plain TensorRT + polygraphy's CUDA buffers, nothing of this project.
FRESH_PROCESS_SCRIPT = r"""
import json, sys
import numpy as np
import tensorrt as trt
from polygraphy import cuda
from polygraphy.datatype import DataType

plan_path, inputs_path, out_path = sys.argv[1:4]
data = np.load(inputs_path)
feeds = {"input_ids": np.ascontiguousarray(data["input_ids"], dtype=np.int32),
         "cu_seqlens": np.ascontiguousarray(data["cu_seqlens"], dtype=np.int32)}
registry = trt.get_plugin_registry()
try:
    creators = [(c.name, c.plugin_namespace) for c in registry.all_creators]
except AttributeError:
    creators = [(c.name, c.plugin_namespace) for c in registry.plugin_creator_list]
runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
with open(plan_path, "rb") as handle:
    engine = runtime.deserialize_cuda_engine(handle.read())
result = {"tensorrt_version": trt.__version__, "deserialized": engine is not None}
if engine is not None:
    context = engine.create_execution_context()
    stream = cuda.Stream()
    pairs = len(feeds["cu_seqlens"]) - 1
    buffers = {name: cuda.DeviceArray(array.shape, DataType.INT32).copy_from(array, stream)
               for name, array in feeds.items()}
    buffers["scores"] = cuda.DeviceArray((pairs, 1), DataType.FLOAT32)
    for name, array in feeds.items():
        context.set_input_shape(name, array.shape)
    for name, buffer in buffers.items():
        context.set_tensor_address(name, buffer.ptr)
    result["ran"] = bool(context.execute_async_v3(stream.ptr))
    scores = np.empty((pairs, 1), dtype=np.float32)
    buffers["scores"].copy_to(scores, stream)
    stream.synchronize()
    result["scores"] = scores.ravel().tolist()
result["ettin_creators"] = [list(c) for c in creators if c[1] == "ettin" or c[0] == "VarlenAttention"]
watched = ("ettin_plugins", "ettin_export", "ettin_runtime", "torch", "triton")
result["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in watched or m == "tensorrt.plugin")
with open(out_path, "w") as handle:
    json.dump(result, handle)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="h100", help="a TensorRT target preset (default h100)")
    parser.add_argument("--size", default="17m", help="Ettin size to build with random weights (default 17m)")
    parser.add_argument("--keep", metavar="DIR", help="build into DIR and keep it (default: a temporary folder)")
    parser.add_argument("--parity-queries", type=int, default=4, help="queries in the engine parity set")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


# --- check 2: the plan in a fresh process --------------------------------------------------------------------


def fresh_process_check(plan: Path, runtime, workdir: Path, timeout: float = 300.0) -> dict:
    """Run the plan in a new interpreter without this project and compare with this process's runtime."""
    import numpy as np

    from ettin_runtime.packing import pack

    from ettin_export.synthetic.text import random_pairs

    pairs = random_pairs(FRESH_PROCESS_PAIRS, seed=7, document_words=(1, 300))
    batch = pack(runtime.encoder.encode(pairs))
    inputs = workdir / "fresh_process_inputs.npz"
    np.savez(inputs, input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens)
    expected = runtime.session.run(batch.input_ids, batch.cu_seqlens)
    out = workdir / "fresh_process_result.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ)
    repo = Path(__file__).resolve().parents[1]
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and not Path(p).resolve().is_relative_to(repo)]  # nothing of this checkout on its path
    env["PYTHONPATH"] = os.pathsep.join(kept)
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(plan), str(inputs), str(out)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    result = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    if proc.returncode != 0 or not out.is_file():
        result.update(passed=False, detail=f"the fresh process failed (exit {proc.returncode}): {proc.stderr[-400:]}")
        return result
    child = json.loads(out.read_text())
    result.update(child)
    project = [m for m in child["modules"] if m.split(".")[0].startswith("ettin")]
    diff = (float(np.max(np.abs(np.asarray(child.get("scores", []), dtype=np.float32) - expected)))
            if child.get("ran") and len(child.get("scores", [])) == len(expected) else float("inf"))
    result["max_abs_diff_vs_runtime"] = diff
    problems = []
    if not child.get("deserialized"):
        problems.append("plain TensorRT could not deserialize the plan")
    elif not child.get("ran"):
        problems.append("the engine did not run")
    if project:
        problems.append(f"project modules were imported: {project}")
    if child.get("ettin_creators"):
        problems.append(f"an ettin plugin creator was registered: {child['ettin_creators']}")
    if not diff <= 1e-3:
        problems.append(f"its scores differ from this process's runtime by {diff:.3g}")
    result["passed"] = not problems
    plugin_note = ("tensorrt.plugin was imported by TensorRT itself" if "tensorrt.plugin" in child["modules"]
                   else "tensorrt.plugin never imported")
    result["detail"] = ("; ".join(problems) if problems else
                        f"{len(expected)} pairs scored by TensorRT {child['tensorrt_version']} alone (no ettin module, "
                        f"no ettin plugin creator, {plugin_note}); max |Δ| vs the runtime {diff:.2g}")
    return result


# --- the command --------------------------------------------------------------------------------------------


def run(args) -> int:
    from ettin_export.errors import BuildError
    from ettin_export.targets import get_target

    try:
        target = get_target(args.target)
    except ValueError as error:
        print(f"ettin-export selftest: error: {error}", file=sys.stderr)
        return 2
    if target.engine != "tensorrt":
        print(f"ettin-export selftest: --target {target.name} is not a TensorRT target; the selftest proves TensorRT "
              "engines (try --target h100).", file=sys.stderr)
        return 2
    from ettin_export.engine.tensorrt import preflight

    try:
        facts = preflight(target)
    except BuildError as error:
        print(f"ettin-export selftest: cannot run on this machine:\n{error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ettin-selftest-") as scratch:
        workdir = Path(args.keep) if args.keep else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        results = _run_checks(args, target, workdir)
    results.update(environment=facts, seconds=round(time.perf_counter() - started, 1),
                   kept=str(Path(args.keep).resolve()) if args.keep else None)
    passed = all(results["checks"][name]["status"] == "PASS" for name in CHECKS)
    results["passed"] = passed
    if args.json:
        json.dump(results, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(format_verdict(results, target, args.size))
    return 0 if passed else 1


def _run_checks(args, target, workdir: Path) -> dict:
    import torch

    from ettin_export.parity.kernel import kernel_parity

    from ettin_runtime import Artifact

    from ettin_export.checkpoint import open_source
    from ettin_export.errors import BuildError
    from ettin_export.pipeline import BuildOptions, run_build

    checks = {name: {"status": "SKIP", "detail": "not reached"} for name in CHECKS}
    out = workdir / f"{args.size}-random-{target.name}"
    options = BuildOptions(out=out, target=target, force=True, check_crossencoder=False,
                           parity_queries=args.parity_queries,
                           command_line=["ettin-export", "selftest", "--target", target.name, "--size", args.size])
    try:
        status = run_build(lambda: open_source(size=args.size, random_weights=True), options)
    except BuildError as error:
        checks["plugin layers"] = {"status": "FAIL", "detail": f"the build stopped: {error}"}
        return {"checks": checks, "artifact": None}
    except Exception as error:  # noqa: BLE001 - TensorRT or polygraphy failing inside the build
        checks["plugin layers"] = {"status": "FAIL", "detail": f"the build failed: {type(error).__name__}: {error}"}
        return {"checks": checks, "artifact": None}
    artifact = Artifact.open(out if status == 0 else out.parent / f"{out.name}.rejected")
    layers, nodes = artifact.engine.tensorrt.plugin_layers, artifact.engine.tensorrt.attention_nodes
    checks["plugin layers"] = {
        "status": "PASS" if layers and layers == nodes else "FAIL",
        "detail": f"{layers} plugin layers for {nodes} VarlenAttention nodes",
    }
    parity = json.loads(artifact.path("parity.json").read_text())
    metrics, lowp = parity["metrics"], parity.get("reference_lowp_metrics") or {}
    checks["engine parity"] = {
        "status": "PASS" if parity["passed"] else "FAIL",
        "detail": (f"max |Δ| {metrics['max_abs_diff']:.3g} (bound "
                   f"{parity['bounds'].get('max_abs_diff', float('nan')):.3g} = {target.bounds.error_ratio} x "
                   f"{lowp.get('max_abs_diff', float('nan')):.3g}, {parity.get('reference_lowp')}, against "
                   f"{parity.get('reference')}); "
                   f"Spearman {metrics['spearman']:.5f}, top-1 {metrics['top1_agreement']:.0%}, "
                   f"top-10 {metrics['top10_overlap']:.3f}" + ("" if parity["passed"] else f"; {parity['failures']}")),
    }
    try:
        runtime = artifact.load(runtime="tensorrt")
        fresh = fresh_process_check(artifact.path(artifact.engine.file), runtime, workdir)
        checks["fresh process"] = {"status": "PASS" if fresh["passed"] else "FAIL", "detail": fresh["detail"],
                                   "result": fresh}
    except Exception as error:  # noqa: BLE001 - one check failing must not hide the others
        checks["fresh process"] = {"status": "FAIL", "detail": f"{type(error).__name__}: {error}"}
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        parity_k = kernel_parity(torch)
        worst = max(parity_k["cases"].values(), key=lambda c: c["errors"].get("triton", 0) / c.get("bound", 1))
        checks["kernel parity"] = {
            "status": "PASS" if parity_k["pass"] else "FAIL",
            "detail": (f"{len(parity_k['cases']) - len(parity_k['failed'])}/{len(parity_k['cases'])} cases within 2 x "
                       f"PyTorch's bf16 error; tightest: kernel {worst['errors'].get('triton', float('nan')):.3g} vs "
                       f"bound {worst.get('bound', float('nan')):.3g} ({worst.get('yardstick')})"
                       + (f"; failed: {parity_k['failed']}" if parity_k["failed"] else "")),
            "result": parity_k,
        }
    except Exception as error:  # noqa: BLE001
        checks["kernel parity"] = {"status": "FAIL", "detail": f"{type(error).__name__}: {error}"}
    return {"checks": checks, "artifact": str(artifact.root)}


def format_verdict(results: dict, target, size: str) -> str:
    env = results.get("environment", {})
    lines = [f"ettin-export selftest --target {target.name} ({size}, random weights) on {env.get('gpu_name', '?')} "
             f"(driver {env.get('driver_version', '?')}, CUDA {env.get('cuda_driver_version', '?')}), TensorRT "
             f"{env.get('tensorrt_version', '?')}, kernels as PTX ISA {env.get('ptx_version', '?')}"]
    lines += [f"  WARNING: {warning}" for warning in env.get("warnings", [])]
    for name in CHECKS:
        check = results["checks"][name]
        lines.append(f"  [{check['status']}] {name:<14} {check['detail']}")
    lines.append(f"SELFTEST {'PASSED' if results['passed'] else 'FAILED'} ({results.get('seconds', '?')} s)")
    return "\n".join(lines)
