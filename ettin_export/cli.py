"""The `ettin-export` command line. Heavy modules (torch, onnx, tensorrt) are imported by the command
that needs them, so `ettin-export score ARTIFACT` works on a runtime-only install."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


class UsageError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _add_model_arguments(parser: argparse.ArgumentParser, *, allow_artifact: bool) -> None:
    what = "an artifact folder, a checkpoint folder or a hub id" if allow_artifact else "a checkpoint folder or hub id"
    parser.add_argument("model", nargs="?", help=f"{what} (or use --size)")
    parser.add_argument("--size", help="an Ettin size: 17m, 32m, 68m, 150m, 400m, 1b")
    parser.add_argument(
        "--random-weights", action="store_true",
        help="with --size: the exact config with random weights, made offline (for tests and speed work)",
    )
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--max-length", type=int,
                        help="tokens per pair, longer pairs are truncated (default: the checkpoint's own limit, as "
                             "CrossEncoder reads it; an artifact's recorded max_length)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ettin-export",
        description="Export ModernBERT (Ettin) rerankers to packed, parity-checked ONNX / TensorRT artifacts.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sizes_cmd = commands.add_parser("sizes", help="the six Ettin sizes, their configs and parameter counts")
    sizes_cmd.add_argument("--json", action="store_true", help="machine-readable output")

    score = commands.add_parser("score", help="score (query, document) pairs from a JSON-lines file")
    _add_model_arguments(score, allow_artifact=True)
    score.add_argument("--pairs", required=True, help='JSON lines, one {"query": ..., "document": ...} per line')
    score.add_argument("--out", help="write the scores here (default: stdout)")
    score.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    score.add_argument("--batch-size", type=int, help="at most this many pairs per forward pass")
    score.add_argument("--activation", choices=["sigmoid", "identity", "default"],
                       help="apply an activation to the raw scores (default: none, raw scores)")
    score.add_argument("--device", default="cpu", help="torch runtime: cpu or cuda")
    score.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="torch runtime precision")

    build = commands.add_parser("build", help="export a reranker to a parity-checked artifact folder")
    _add_model_arguments(build, allow_artifact=False)
    build.add_argument("--target", default="cpu", help="cpu (fp32 ONNX Runtime) or h100 (bf16 TensorRT)")
    build.add_argument("--out", help="artifact folder (default: artifacts/<name>-<target>)")
    build.add_argument("--max-batch-size", type=int, help="most pairs per forward pass (TensorRT: the profile's)")
    build.add_argument("--max-batch-tokens", type=int, help="most tokens per forward pass")
    build.add_argument("--force", action="store_true", help="replace an existing artifact at --out")
    build.add_argument("--onnx-only", action="store_true", help="h100: write the bf16 ONNX and stop (no TensorRT here)")
    build.add_argument("--skip-crossencoder-check", action="store_true",
                       help="do not compare the packed model with sentence-transformers before exporting")
    build.add_argument("--parity-queries", type=int,
                       help="queries (30-100 documents each) in the built-in parity set (default 10; 2 for models "
                            "above hidden size 512 on the CPU target)")
    build.add_argument("--quiet", action="store_true", help="no progress output")

    for name, (module_name, help_text) in PLUGGED_COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # a command module not in this build
        module.add_arguments(commands.add_parser(name, help=help_text))
    return parser


# Commands that live in their own module: `add_arguments(parser)` and `run(args) -> exit status`.
# Those modules import heavy dependencies inside run(), never at import time.
PLUGGED_COMMANDS = {
    "verify": ("ettin_export.verify", "parity report of an artifact against its reference model"),
    "bench": ("ettin_export.bench", "pairs/s of an artifact or model against the sentence-transformers baseline"),
    "deploy": ("ettin_export.deploy", "generate a Triton Inference Server model repository from an artifact"),
    "selftest": ("ettin_export.selftest", "on a GPU with TensorRT: prove an engine end to end, one verdict"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handlers = {"sizes": _cmd_sizes, "score": _cmd_score, "build": _cmd_build}
    handler = handlers.get(args.command) or importlib.import_module(PLUGGED_COMMANDS[args.command][0]).run
    try:
        return handler(args) or 0
    except UsageError as error:
        print(f"ettin-export {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as error:
        # Our own errors carry what was wrong and what to do; show them without a traceback.
        print(f"ettin-export {args.command}: error: {error}", file=sys.stderr)
        return 2


def _cmd_sizes(args) -> int:
    from . import sizes

    rows = []
    for spec in sizes.SIZES.values():
        rows.append({
            "size": spec.name, "reranker": spec.reranker_id, "backbone": spec.backbone_id,
            "hidden": spec.hidden, "layers": spec.layers, "heads": spec.heads, "head_dim": spec.head_dim,
            "intermediate": spec.intermediate, "global_layers": spec.global_layers(),
            "backbone_params": spec.backbone_params(), "head_params": spec.head_params(),
            "total_params": spec.backbone_params() + spec.head_params(),
            "published_params_m": spec.published_params_m,
        })
    if args.json:
        shared = {
            "vocab_size": sizes.VOCAB_SIZE, "head_dim": sizes.HEAD_DIM, "local_attention": sizes.LOCAL_ATTENTION,
            "local_window_half_width": sizes.LOCAL_ATTENTION // 2,
            "global_attn_every_n_layers": sizes.GLOBAL_ATTN_EVERY_N_LAYERS,
            "global_rope_theta": sizes.GLOBAL_ROPE_THETA, "local_rope_theta": sizes.LOCAL_ROPE_THETA,
            "norm_eps": sizes.NORM_EPS, "max_position_embeddings": sizes.MAX_POSITION_EMBEDDINGS,
            "cls_token_id": sizes.CLS_TOKEN_ID, "sep_token_id": sizes.SEP_TOKEN_ID, "pad_token_id": sizes.PAD_TOKEN_ID,
        }
        print(json.dumps({"shared": shared, "sizes": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Ettin rerankers (cross-encoder/ettin-reranker-<size>-v1)")
    for column in ("size", "hidden", "layers", "heads", "intermediate", "backbone", "head", "total", "published"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["size"], str(row["hidden"]), str(row["layers"]), str(row["heads"]), str(row["intermediate"]),
            f"{row['backbone_params'] / 1e6:.2f}M", f"{row['head_params'] / 1e6:.3f}M",
            f"{row['total_params'] / 1e6:.2f}M", f"{row['published_params_m']}M",
        )
    console = Console()
    console.print(table)
    console.print(
        f"All sizes: vocab {sizes.VOCAB_SIZE}, head_dim {sizes.HEAD_DIM}, local window {sizes.LOCAL_ATTENTION} "
        f"(|i-j| <= {sizes.LOCAL_ATTENTION // 2}), global every {sizes.GLOBAL_ATTN_EVERY_N_LAYERS} layers from 0, "
        f"RoPE theta {sizes.GLOBAL_ROPE_THETA:g} (global and local), max {sizes.MAX_POSITION_EMBEDDINGS} tokens."
    )
    return 0


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """JSON lines with "query" and "document" strings ("-": standard input); an empty file is no pairs."""
    from .pairs import PairsFileError, read_pairs_jsonl

    try:
        return read_pairs_jsonl(path, allow_empty=True)
    except PairsFileError as error:
        raise UsageError(str(error)) from error


def open_reranker(args, runtime: str = "auto"):
    """A Reranker for what the command line names: an artifact (its own runtime) or a checkpoint (torch)."""
    is_artifact = args.model is not None and (Path(args.model) / "manifest.json").is_file()
    if is_artifact and runtime in ("auto", "onnxruntime", "tensorrt"):
        from ettin_runtime import Reranker

        kwargs = {} if args.max_length is None else {"max_length": args.max_length}
        return Reranker.load(args.model, **kwargs)
    if runtime not in ("auto", "torch"):
        raise UsageError(f"--runtime {runtime} needs an artifact folder built by `ettin-export build`.")
    import torch

    from .checkpoint import open_source
    from .torch_runtime import TorchReranker

    checkpoint = open_source(
        args.model, size=args.size, random_weights=args.random_weights, revision=args.revision,
        max_length=args.max_length,
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[getattr(args, "dtype", "float32")]
    return TorchReranker.from_checkpoint(checkpoint, dtype=dtype, device=getattr(args, "device", "cpu"))


def _cmd_score(args) -> int:
    pairs = read_pairs(args.pairs)
    reranker = open_reranker(args, args.runtime)
    scores = reranker.predict(pairs, batch_size=args.batch_size, activation=args.activation)
    lines = "".join(json.dumps({"score": float(s)}) + "\n" for s in scores)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    return 0


def _cmd_build(args) -> int:
    from .build import BuildError, BuildOptions, run_build
    from .checkpoint import open_source
    from .onnx_export import ExportError
    from .targets import get_target

    target = get_target(args.target)
    if args.model is None and args.size is None:
        raise UsageError("name a model: a checkpoint folder or hub id, or --size SIZE [--random-weights].")
    name = args.size or Path(args.model.rstrip("/")).name
    out = Path(args.out) if args.out else Path("artifacts") / f"{name}{'-random' if args.random_weights else ''}-{target.name}"
    options = BuildOptions(
        out=out, target=target, max_length=args.max_length, max_batch_pairs=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens, force=args.force, onnx_only=args.onnx_only,
        check_crossencoder=not args.skip_crossencoder_check, parity_queries=args.parity_queries, quiet=args.quiet,
    )

    def load():
        return open_source(args.model, size=args.size, random_weights=args.random_weights,
                           revision=args.revision, max_length=args.max_length)

    options.command_line = ["ettin-export", *args.argv]
    try:
        return run_build(load, options)
    except (BuildError, ExportError) as error:  # BuildError includes "TensorRT missing" / "wrong GPU"
        raise UsageError(str(error)) from error


if __name__ == "__main__":
    sys.exit(main())
