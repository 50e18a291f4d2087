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
    parser.add_argument("--parity-queries", type=int,
                        help="queries in the built-in parity set (default: as many as the build judged on)")
    parser.add_argument("--device", default="auto", help="where the PyTorch reference runs: cpu, cuda or auto")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="verify an artifact that failed its parity gate or never reached it (DIR.rejected)")


def resolve_reference(artifact, reference: str | None):
    """The checkpoint an artifact was built from (or the one named), refusing a different one."""
    from ettin_export.checkpoint import open_source
    from ettin_export.errors import CheckpointError
    from ettin_export.parity.references import weights_fingerprint

    source = artifact.source
    if reference is not None:
        checkpoint = open_source(reference, max_length=artifact.max_length)
    elif source.random_size:
        checkpoint = open_source(size=source.random_size, random_weights=True, max_length=artifact.max_length)
    elif source.model:
        checkpoint = open_source(source.model, revision=source.revision, max_length=artifact.max_length)
    else:
        raise CheckpointError("the manifest names no source model; pass --reference MODEL.")
    if source.weights_sha256 and weights_fingerprint(checkpoint) != source.weights_sha256:
        raise CheckpointError(
            f"the reference {checkpoint.source} does not hold the weights this artifact was built from "
            "(weights_sha256 differs). Pass the right checkpoint with --reference."
        )
    return checkpoint


def run(args) -> int:
    from ettin_export.commands.common import positive_options, torch_device

    import torch

    from ettin_runtime import Artifact

    from ettin_export.parity import builtin_parity_set, flatten, format_report, read_parity_file
    from ettin_export.parity.references import ReferenceMismatch
    from ettin_export.parity.run import reference_run
    from ettin_export.progress import Steps
    from ettin_export.targets import get_target

    positive_options(args, "parity_queries")
    if args.device != "auto":
        torch_device(args.device)
    artifact = Artifact.open(args.artifact, allow_unverified=args.allow_unverified)
    target = get_target(artifact.target)
    steps = Steps(f"ettin-export verify {args.artifact}", quiet=args.json)
    with steps.step("loading the artifact and its reference checkpoint"):
        runtime = artifact.load()
        checkpoint = resolve_reference(artifact, args.reference)
    # The parity set the build judged on, unless asked otherwise (its size is what the build chose).
    queries = args.parity_queries or (artifact.parity.queries if artifact.parity else None) or 10
    groups = read_parity_file(args.pairs) if args.pairs else builtin_parity_set(0, queries)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with runtime:
        pairs, _ = flatten(groups)
        with steps.step(f"scoring {len(pairs)} pairs with the artifact"):
            candidate = runtime.predict(pairs)
        try:
            run = reference_run(checkpoint, runtime.encoder, groups, device=device, steps=steps)
        except ReferenceMismatch as error:
            steps.console.print(f"  FAILED: {error}")
            return 1
    candidate_name = f"{artifact.engine.runtime} {artifact.precision} ({Path(args.artifact).name})"
    with steps.step(f"judging against the {target.precision} bounds"):
        report = run.judge(target, candidate_name, candidate, precision=artifact.precision)
        if target.engine == "onnx":
            from ettin_export.build.cpu import record_machine

            record_machine(report, runtime, artifact.engine.runtime)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0 if report.passed else 1
