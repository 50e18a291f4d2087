"""`ettin-export verify ARTIFACT`: the parity report of a built artifact against its reference model.

Exit status 0 when every bound of the artifact's target holds, 1 when one does not, 2 when the
artifact or the reference cannot be used. `--json` prints the whole report on stdout for CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="an artifact folder written by `ettin-export build`")
    parser.add_argument("--reference", help="reference checkpoint (path or hub id); default: the artifact's source")
    parser.add_argument("--pairs", help='JSON lines {"query", "document"} to check on, grouped by query '
                                        "(default: the built-in parity set)")
    parser.add_argument("--parity-queries", type=int, default=10, help="queries in the built-in parity set")
    parser.add_argument("--device", default="auto", help="where the PyTorch reference runs: cpu, cuda or auto")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def resolve_reference(manifest, reference: str | None, max_length: int):
    """The checkpoint an artifact was built from (or the one named), refusing a different one."""
    from .checkpoint import CheckpointError, open_source
    from .reference import weights_fingerprint

    source = manifest.source
    if reference is not None:
        checkpoint = open_source(reference, max_length=max_length)
    elif str(source.get("model", "")).startswith("random:"):
        checkpoint = open_source(size=source["model"].split(":", 1)[1], random_weights=True, max_length=max_length)
    elif source.get("model"):
        checkpoint = open_source(source["model"], revision=source.get("revision"), max_length=max_length)
    else:
        raise CheckpointError("the manifest names no source model; pass --reference MODEL.")
    expected = source.get("weights_sha256")
    if expected and weights_fingerprint(checkpoint) != expected:
        raise CheckpointError(
            f"the reference {checkpoint.source} does not hold the weights this artifact was built from "
            "(weights_sha256 differs). Pass the right checkpoint with --reference."
        )
    return checkpoint


def run(args) -> int:
    import torch

    from ettin_runtime import Reranker
    from ettin_runtime.manifest import read_manifest

    from .parity import ParityMetrics, builtin_parity_set, flatten, format_report, judge, read_parity_file
    from .reference import bf16_reference, fp32_reference
    from .targets import get_target

    manifest = read_manifest(args.artifact)
    target = get_target(manifest.target)
    runtime = Reranker.load(args.artifact)
    checkpoint = resolve_reference(manifest, args.reference, manifest.max_length)
    groups = read_parity_file(args.pairs) if args.pairs else builtin_parity_set(0, args.parity_queries)
    pairs, spans = flatten(groups)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    candidate = runtime.predict(pairs)
    reference, reference_name = fp32_reference(checkpoint, pairs, runtime.encoder, device)
    metrics = ParityMetrics.compute(reference, candidate, spans)
    lowp_name = lowp_metrics = None
    if manifest.precision == "bf16":
        lowp, lowp_name = bf16_reference(checkpoint, pairs, runtime.encoder, device)
        lowp_metrics = ParityMetrics.compute(reference, lowp, spans)
    candidate_name = f"{manifest.engine.get('format')} {manifest.precision} ({Path(args.artifact).name})"
    report = judge(target, candidate_name, reference_name, metrics, lowp_name, lowp_metrics)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0 if report.passed else 1
