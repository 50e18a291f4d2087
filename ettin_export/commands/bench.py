"""`ettin-export bench ARTIFACT | MODEL`: pairs/s and tokens/s against sentence-transformers' CrossEncoder
on the same pairs, in the same process (the protocol and the measuring are ettin_export.bench.measure).

    ettin-export bench ARTIFACT [--reference CHECKPOINT] [--lengths nq-like|short|long|FILE.jsonl] [--json]
    ettin-export bench --size 17m --random-weights        # candidate: the packed PyTorch model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from ettin_runtime.machine import cpu_threads

from ettin_export.bench.measure import (
    BASELINE_BATCH_SEARCH,
    DEFAULT_BASELINE_BATCH_SIZE,
    DEFAULT_PAIRS,
    DEFAULT_RUNS,
    LOADED_CORES,
    SCHEMA,
    CrossEncoderContender,
    MachineLoad,
    RerankerContender,
    Setup,
    cpu_features,
    cpu_name,
    format_report,
    gpu_peak,
    measure,
)
from ettin_export.commands.common import (
    add_pair_source_arguments,
    add_model_arguments,
    checked_output,
    positive_options,
    torch_device,
    write_atomically,
)
from ettin_export.errors import UsageError
from ettin_export.sizes import forward_flops

EXIT_UNRELIABLE = 4  # the machine was loaded while measuring: figures are shown, no ratio is claimed


def add_arguments(parser) -> None:
    add_model_arguments(parser, allow_artifact=True)  # an artifact: its runtime; a checkpoint: the packed PyTorch model
    parser.add_argument("--reference", help="artifact only: the checkpoint CrossEncoder loads (default: the "
                        "manifest's source; random:<size> is the cached random checkpoint)")
    parser.add_argument("--baseline", default="sentence-transformers", choices=["sentence-transformers", "openvino-padded", "none"],
                        help="sentence-transformers: CrossEncoder (default); openvino-padded: OpenVINO at the "
                             "artifact's precision on a padded ONNX export of the same modules (what optimum "
                             "exports); none")
    add_pair_source_arguments(parser)
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="pairs per timed pass")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed passes per system and mode (>= 5)")
    parser.add_argument("--max-retries", type=int, default=2 * DEFAULT_RUNS,
                        help="runs measured again because other processes loaded the machine meanwhile")
    parser.add_argument("--timing", default="both", choices=["both", "inside", "outside"],
                        help="tokenization inside the timed region, outside it, or both")
    parser.add_argument("--candidate-batch-size", type=int,
                        help="most pairs per forward pass of the candidate (default: its runtime's own)")
    parser.add_argument("--candidate-batch-tokens", type=int,
                        help="token budget per forward pass of the candidate, packed with no padding "
                        "(default: its runtime's own)")
    parser.add_argument("--baseline-batch-size", type=_batch_size, default=DEFAULT_BASELINE_BATCH_SIZE,
                        help=f"CrossEncoder.predict batch_size, or `auto`: the fastest of {BASELINE_BATCH_SEARCH} "
                        f"on these pairs (default {DEFAULT_BASELINE_BATCH_SIZE}, measured best on a 2-core CPU)")
    parser.add_argument("--threads", type=int, help="intra-op threads for both systems, torch's too (default: "
                        "$ETTIN_CPU_THREADS, else all cores)")
    parser.add_argument("--device", help="cpu or cuda, for the baseline and a torch candidate (default: cuda for "
                        "a GPU artifact, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="baseline and torch candidate precision (default: bfloat16 on cuda, else float32)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for the FLOP/s fraction")
    parser.add_argument("--fail-below", type=float, metavar="RATIO",
                        help="exit 1 when candidate/baseline pairs/s (tokenization inside) is below RATIO")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or `auto`, got {text!r}")
    return value


def open_setup(args) -> Setup:
    """The candidate and baseline the command line names."""
    from ettin_runtime import Artifact
    from ettin_runtime.artifact import is_artifact

    if args.model is None and args.size is None:
        raise UsageError("name what to measure: an artifact folder, a checkpoint, or --size SIZE --random-weights.")
    if args.runs < 5:
        raise UsageError(f"--runs {args.runs}: medians need at least 5 timed runs.")
    positive_options(args, "pairs", "candidate_batch_size", "candidate_batch_tokens", "threads", "max_retries",
                     allow_zero=("max_retries",))
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UsageError(f"--peak-tflops must be a positive number (the device's peak); got {args.peak_tflops}.")
    if args.device is not None:
        torch_device(args.device)
    import torch

    args.threads = cpu_threads(args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    if is_artifact(args.model):
        if args.size is not None:
            raise UsageError("pass an artifact folder or --size, not both.")
        artifact = Artifact.open(args.model, allow_unverified=args.allow_unverified)
        args.device = args.device or ("cpu" if artifact.engine.format == "onnx" else "cuda")
        args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
        reranker = artifact.load(device=args.device, threads=args.threads, max_length=args.max_length)
        max_length = reranker.max_length
        candidate = RerankerContender(reranker, {
            "kind": f"{artifact.engine.format} artifact ({type(reranker).__name__})", "artifact": str(args.model),
            "precision": artifact.precision, "target": artifact.target,
            "onnxruntime_version": artifact.engine.onnxruntime_version, "parity": _gate_of(artifact),
        }, args.candidate_batch_size, args.candidate_batch_tokens)
        reference = args.reference or _reference_of(artifact)
        model = {**artifact.model.to_json(), "source": artifact.source.model, "size": artifact.source.size,
                 "random_weights": artifact.random_weights}
        precision = artifact.precision
    else:
        from ettin_export.commands.common import open_checkpoint
        from ettin_export.model.torch_reranker import TorchReranker

        if args.reference:
            raise UsageError("--reference is for artifacts; for a checkpoint the baseline is that checkpoint.")
        args.device = args.device or "cpu"
        args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
        checkpoint = open_checkpoint(args)
        max_length = checkpoint.max_length  # --max-length, else the checkpoint's own rule
        reranker = TorchReranker.from_checkpoint(checkpoint, dtype=getattr(torch, args.dtype), device=args.device)
        candidate = RerankerContender(reranker, {
            "kind": "packed PyTorch model (TorchReranker)", "checkpoint": checkpoint.source,
            "precision": "fp32" if args.dtype == "float32" else "bf16", "device": args.device,
            "torch_version": torch.__version__,
        }, args.candidate_batch_size, args.candidate_batch_tokens)
        reference = str(checkpoint.path)
        config = checkpoint.config
        model = {"hidden_size": config.hidden_size, "num_layers": config.num_layers, "num_heads": config.num_heads,
                 "intermediate_size": config.intermediate_size, "windows": list(config.windows),
                 "source": checkpoint.source, "size": checkpoint.size, "random_weights": checkpoint.random_weights}
        precision = candidate.description["precision"]
    baseline = None
    if args.baseline == "sentence-transformers":
        baseline = CrossEncoderContender(reference, max_length, args.baseline_batch_size, args.device, args.dtype)
    elif args.baseline == "openvino-padded":
        from ettin_export.bench.openvino_padded import OpenVinoPaddedContender

        if args.device not in (None, "cpu"):
            raise UsageError("--baseline openvino-padded runs on the CPU.")
        baseline = OpenVinoPaddedContender(reference, max_length, args.baseline_batch_size, precision,
                                           threads=args.threads)  # the candidate's threads, torch's too
    return Setup(candidate, baseline, model, max_length, reranker.encoder._tokenizer, precision)


def _gate_of(artifact) -> str:
    """What the artifact's parity gate said: "passed", or what --allow-unverified let through."""
    if artifact.parity is None:
        return "never reached (a staging folder; opened with --allow-unverified)"
    if not artifact.parity.passed:
        return "FAILED (a rejected build; opened with --allow-unverified)"
    return "passed"


def _reference_of(artifact) -> str:
    """The checkpoint CrossEncoder loads for an artifact: its source (a random size: the cached one)."""
    source = artifact.source
    if source.random_size:
        from ettin_export.checkpoint import random_checkpoint_dir

        return str(random_checkpoint_dir(source.random_size))
    if source.model and (Path(source.model).is_dir() or source.model.count("/") == 1):
        return source.model
    raise UsageError(f"the artifact's source {source.model!r} cannot be loaded here; pass --reference CHECKPOINT.")


def run(args) -> int:
    from ettin_export.synthetic.lengths import length_statistics, load_pairs

    out = checked_output(args.out, reads=(args.lengths,)) if args.out else None
    log = (lambda message: None) if args.quiet else (lambda message: print(f"bench: {message}", file=sys.stderr))
    load = MachineLoad()
    setup = open_setup(args)
    pairs, lengths_description = load_pairs(args.lengths, setup.tokenizer, args.pairs, args.seed)
    stats = length_statistics(pairs, setup.tokenizer, setup.max_length)
    pair_lengths = np.array([len(ids) for ids in setup.candidate.reranker.encoder.encode(pairs)])
    tokens = int(pair_lengths.sum())
    flops = forward_flops(setup.model["hidden_size"], setup.model["intermediate_size"], setup.model["windows"],
                          pair_lengths)
    log(f"{len(pairs)} pairs ({lengths_description}), {tokens} tokens, mean {tokens / len(pairs):.1f} per pair")
    modes = {"both": ["inside", "outside"], "inside": ["inside"], "outside": ["outside"]}[args.timing]
    measured = measure(setup, pairs, args.runs, modes, log, args.max_retries)

    device_name, gpu = cpu_name(), None
    if args.device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(args.device))
        device_name = gpu
    peak = gpu_peak(gpu, setup.precision, args.peak_tflops)
    # A ratio measured while other processes loaded the machine is no result: it is kept aside, never as
    # `ratio`, and the exit status says so.
    reliable = measured["loaded_runs_kept"] == 0
    results = {}
    for mode, timings in measured["timings"].items():
        entry = {name: t.summary(len(pairs), tokens, flops) for name, t in timings.items()}
        if "baseline" in timings:
            ratio = timings["baseline"].median / timings["candidate"].median
            entry["ratio"] = ratio if reliable else None
            if not reliable:
                entry["unreliable_ratio"] = ratio
        if peak:
            for name in timings:
                entry[name]["fraction_of_peak"] = entry[name]["gflops_per_s"] / 1e3 / peak
        results[f"tokenization_{mode}"] = entry
    scores = measured["scores"]
    report = {
        "schema": SCHEMA,
        "command": command_line(args),
        "reliable": reliable,
        "machine": {
            "device": device_name, "cpu": cpu_name(), "cpu_features": cpu_features(), "cores": os.cpu_count(), "gpu": gpu,
            "threads": args.threads or os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), **load.finish(measured["loaded_runs_kept"]),
        },
        "model": setup.model,
        "lengths": {"profile": args.lengths, "description": lengths_description, "seed": args.seed, **stats},
        "candidate": setup.candidate.description,
        "baseline": setup.baseline.description if setup.baseline else None,
        "runs": args.runs, "warmup_runs": 1, "retried_runs": measured["retried_runs"],
        "loaded_runs_kept": measured["loaded_runs_kept"],
        "flops": {"per_pair_mean": flops / len(pairs), "total": flops, "peak_tflops": peak},
        "results": results,
        "scores_max_abs_diff": (float(np.max(np.abs(scores["candidate"] - scores["baseline"])))
                                if "baseline" in scores else None),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        write_atomically(out, text + "\n")
    print(text if args.json else format_report(report))
    if report["machine"]["loaded"]:
        kept, retried = report["loaded_runs_kept"], report["retried_runs"]
        print(f"bench: WARNING: {kept} of the {args.runs * len(modes)} timed rounds ran while other processes used "
              f"more than {LOADED_CORES} cores ({retried} rounds were measured again; on average "
              f"{report['machine']['other_processes_cores']} cores over the whole bench); the figures are suspect: "
              "re-run on a quiet machine.", file=sys.stderr)
        print(f"bench: UNRELIABLE: no ratio is reported (exit {EXIT_UNRELIABLE}).", file=sys.stderr)
        return EXIT_UNRELIABLE
    ratio = results.get("tokenization_inside", {}).get("ratio")
    if args.fail_below is not None and ratio is not None and ratio < args.fail_below:
        print(f"bench: FAILED: candidate/baseline = {ratio:.3f} < {args.fail_below}", file=sys.stderr)
        return 1
    return 0


def command_line(args) -> str:
    """The command that reproduces this run: the options that differ from their defaults."""
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    words = ["ettin-export", "bench"] + ([args.model] if args.model else [])
    for action in parser._actions:
        name = action.dest
        if not action.option_strings or name in ("help", "json", "out", "quiet") or name not in vars(args):
            continue
        value = getattr(args, name)
        if value != defaults.get(name):
            words += [action.option_strings[0]] if value is True else [action.option_strings[0], str(value)]
    return " ".join(words)
