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
    import numpy as np
    import torch

    from ettin_runtime import Reranker
    from ettin_runtime.manifest import read_manifest

    from .parity import builtin_parity_set, flatten, format_report, judge, read_parity_file
    from .progress import Steps
    from .reference import ReferenceMismatch, bf16_references, check_port_on_sample, fp32_references
    from .targets import get_target

    manifest = read_manifest(args.artifact)
    target = get_target(manifest.target)
    steps = Steps(f"ettin-export verify {args.artifact}", quiet=args.json)
    with steps.step("loading the artifact and its reference checkpoint"):
        runtime = Reranker.load(args.artifact)
        checkpoint = resolve_reference(manifest, args.reference, manifest.max_length)
    # The parity set the build judged on, unless asked otherwise (its size is what the build chose).
    queries = args.parity_queries or (manifest.parity or {}).get("queries") or 10
    groups = read_parity_file(args.pairs) if args.pairs else builtin_parity_set(0, queries)
    pairs, spans = flatten(groups)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with steps.step(f"scoring {len(pairs)} pairs with the artifact"):
        candidate = runtime.predict(pairs)
    with steps.step(f"reference runs on {len(pairs)} pairs: the packed model in fp64, CrossEncoder in fp32"):
        references = fp32_references(checkpoint, pairs, runtime.encoder, device)
    with steps.step("checking the packed model against CrossEncoder (fp32 rule both ways)"):
        try:
            port = check_port_on_sample(checkpoint, pairs, references, runtime.encoder, device)
        except ReferenceMismatch as error:
            steps.console.print(f"  FAILED: {error}")
            return 1
    steps.note(f"packed model vs CrossEncoder {port.describe()}")
    if manifest.precision == "bf16":
        with steps.step(f"bf16 flash-attention reference on {len(pairs)} pairs ({device})"):
            references = bf16_references(checkpoint, pairs, runtime.encoder, device,
                                         anchor=(references.anchor, references.anchor_name))
    candidate_name = f"{manifest.engine.get('format')} {manifest.precision} ({Path(args.artifact).name})"
    report = judge(target, candidate_name, np.asarray(candidate), references, spans)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0 if report.passed else 1
