"""`ettin-export build MODEL | --size S --target cpu|h100`: checkpoint -> parity-checked artifact folder
(ettin_export.pipeline). Exit 0 built, 1 parity failed (the build is kept at OUT.rejected), 2 refused."""

from __future__ import annotations

import argparse
from pathlib import Path

from ettin_export.commands.common import add_model_arguments, open_checkpoint
from ettin_export.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, allow_artifact=False)
    parser.add_argument("--target", default="cpu", help="cpu (ONNX graph) or h100 (bf16 TensorRT)")
    parser.add_argument("--precision", choices=["fp32", "int8", "bf16"],
                        help="cpu: fp32 (default; the exact contract), int8 or bf16 (rank like fp32, faster)")
    parser.add_argument("--runtime", choices=["onnxruntime", "openvino"],
                        help="cpu: the runtime the artifact names (default: the fastest installed for the precision, "
                             "timed on this machine)")
    parser.add_argument("--out", help="artifact folder (default: artifacts/<name>-<target>)")
    parser.add_argument("--max-batch-size", type=int, help="most pairs per forward pass (TensorRT: the profile's)")
    parser.add_argument("--max-batch-tokens", type=int, help="most tokens per forward pass")
    parser.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    parser.add_argument("--onnx-only", action="store_true", help="h100: write the bf16 ONNX and stop (no TensorRT here)")
    parser.add_argument("--skip-crossencoder-check", action="store_true",
                        help="do not compare the packed model with sentence-transformers before exporting")
    parser.add_argument("--parity-queries", type=int,
                        help="queries (30-100 documents each) in the built-in parity set (default 10; 2 for models "
                             "above hidden size 512 on the CPU target)")
    parser.add_argument("--parity-pairs", metavar="FILE",
                        help='gate on your own pairs: JSON lines {"query", "document"}, grouped by query (30+ '
                             "documents per query make the ranking bounds meaningful); default: the built-in set")
    parser.add_argument("--traffic", default="nq-like", metavar="PROFILE|FILE",
                        help="cpu: the pairs the candidate runtimes are timed on to choose one: a length profile "
                             "(nq-like, short, long) or a JSON-lines file of your pairs (default nq-like)")
    parser.add_argument("--int8-max-fp32-layers", type=int, metavar="N",
                        help="cpu int8 whose gate fails: keep up to N of its most sensitive linear layers in fp32, "
                             "measured on the parity pairs, until it passes (default: a quarter of them; 0: never)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def default_out(args, target) -> Path:
    if args.size:
        name = args.size
    elif Path(args.model).is_dir():
        name = Path(args.model).resolve().name  # ".", "../ckpt": the folder's own name, not "" ("artifacts/-cpu")
    else:
        name = Path(args.model.rstrip("/")).name  # a hub id's repository name
    precision = f"-{args.precision}" if args.precision and args.precision != target.precision else ""
    return Path("artifacts") / f"{name}{'-random' if args.random_weights else ''}-{target.name}{precision}"


def run(args) -> int:
    from ettin_export.pipeline import BuildOptions, run_build
    from ettin_export.targets import get_target

    target = get_target(args.target)
    if args.model is None and args.size is None:
        raise UsageError("name a model: a checkpoint folder or hub id, or --size SIZE [--random-weights].")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out is empty; name the artifact folder to write (or leave --out out for "
                         f"{default_out(args, target)}).")
    if args.onnx_only and target.engine != "tensorrt":
        raise UsageError(f"--onnx-only stops a TensorRT build after its ONNX; --target {target.name} builds no engine "
                         "(its artifact is the ONNX graph). Leave --onnx-only out.")
    options = BuildOptions(
        out=Path(args.out) if args.out else default_out(args, target), target=target, max_length=args.max_length,
        max_batch_pairs=args.max_batch_size, max_batch_tokens=args.max_batch_tokens, force=args.force,
        onnx_only=args.onnx_only, check_crossencoder=not args.skip_crossencoder_check,
        parity_queries=args.parity_queries, parity_pairs=args.parity_pairs, traffic=args.traffic, quiet=args.quiet, command_line=["ettin-export", *args.argv],
        precision=args.precision, runtime=args.runtime, int8_max_fp32_layers=args.int8_max_fp32_layers,
    )
    return run_build(lambda: open_checkpoint(args), options)
