"""What several commands share: the model arguments, reading a pairs file, and opening what the
command line names (an artifact with its own runtime, or a checkpoint with the packed PyTorch model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ettin_export.errors import UsageError


def add_model_arguments(parser: argparse.ArgumentParser, *, allow_artifact: bool) -> None:
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


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """JSON lines with "query" and "document" strings ("-": standard input); an empty file is no pairs."""
    from ettin_export.pairs import read_pairs_jsonl

    return read_pairs_jsonl(path, allow_empty=True)


def open_checkpoint(args, max_length: int | None = None):
    from ettin_export.checkpoint import open_source

    return open_source(args.model, size=args.size, random_weights=args.random_weights, revision=args.revision,
                       max_length=args.max_length if max_length is None else max_length)


def open_reranker(args, runtime: str = "auto"):
    """A Reranker for what the command line names: an artifact (its own runtime) or a checkpoint (torch)."""
    from ettin_runtime.artifact import is_artifact

    if is_artifact(args.model) and runtime != "torch":
        from ettin_runtime import Artifact

        return Artifact.open(args.model).load(None if runtime == "auto" else runtime, max_length=args.max_length)
    if runtime not in ("auto", "torch"):
        raise UsageError(f"--runtime {runtime} needs an artifact folder built by `ettin-export build`.")
    import torch

    from ettin_export.model.torch_reranker import TorchReranker

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[getattr(args, "dtype", "float32")]
    return TorchReranker.from_checkpoint(open_checkpoint(args), dtype=dtype, device=getattr(args, "device", "cpu"))
