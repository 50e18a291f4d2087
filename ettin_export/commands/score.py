"""`ettin-export score MODEL --pairs FILE.jsonl`: one {"score"} line per pair, in input order."""

from __future__ import annotations

import argparse
import json
import sys

from ettin_export.commands.common import (
    add_model_arguments,
    checked_output,
    open_reranker,
    read_pairs,
    write_atomically,
)
from ettin_export.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, allow_artifact=True)
    parser.add_argument("--pairs", required=True, help='JSON lines, one {"query": ..., "document": ...} per line')
    parser.add_argument("--out", help="write the scores here (default: stdout)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime", "openvino", "tensorrt"])
    parser.add_argument("--batch-size", type=int, help="at most this many pairs per forward pass")
    parser.add_argument("--activation", choices=["sigmoid", "identity", "default"],
                        help="apply an activation to the raw scores (default: none, raw scores)")
    parser.add_argument("--device", default="cpu", help="torch runtime: cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="torch runtime precision")


def run(args) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be an integer of at least 1 (pairs per forward pass); got "
                         f"{args.batch_size}. Leave it out for the runtime's own.")
    out = checked_output(args.out, reads=(args.pairs,)) if args.out else None
    pairs = read_pairs(args.pairs)
    with open_reranker(args, args.runtime) as reranker:
        scores = reranker.predict(pairs, batch_size=args.batch_size, activation=args.activation)
    lines = "".join(json.dumps({"score": float(s)}) + "\n" for s in scores)
    if out is not None:
        write_atomically(out, lines)
    else:
        sys.stdout.write(lines)
    return 0
