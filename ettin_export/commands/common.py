"""What several commands share: the model arguments, reading a pairs file, and opening what the
command line names (an artifact with its own runtime, or a checkpoint with the packed PyTorch model)."""

from __future__ import annotations

import argparse
import os
import tempfile
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
    if allow_artifact:
        parser.add_argument("--allow-unverified", action="store_true",
                            help="open an artifact that failed its parity gate or never reached it (DIR.rejected, a "
                                 "left-over staging folder), to inspect it")


def add_pair_source_arguments(parser: argparse.ArgumentParser, *, lengths: str = "nq-like", seed: int = 0) -> None:
    """--lengths and --seed: where a benchmark's pairs come from (ettin_export.synthetic.lengths.load_pairs)."""
    parser.add_argument("--lengths", default=lengths,
                        help="a length profile (nq-like, short, long; see ettin_export/synthetic/lengths.py) or a "
                        'JSON-lines file of {"query", "document"} pairs')
    parser.add_argument("--seed", type=int, default=seed, help="seed of the generated pairs")


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
    from ettin_runtime.artifact import is_artifact, lost_manifest
    from ettin_runtime.errors import ArtifactError

    if lost_manifest(args.model):
        raise ArtifactError(lost_manifest(args.model))
    if is_artifact(args.model):
        if args.size is not None:
            raise UsageError(f"pass an artifact folder or --size, not both ({args.model} is an artifact).")
        if runtime == "torch":
            raise UsageError(f"--runtime torch runs a checkpoint with the packed PyTorch model; {args.model} is an "
                             "artifact, which runs on the runtime its manifest names. Leave --runtime out, or pass "
                             "the checkpoint it was built from.")
        torch_only = [f"--{name} {getattr(args, name)}" for name, default in (("device", "cpu"), ("dtype", "float32"))
                      if getattr(args, name, default) != default]
        if torch_only:
            raise UsageError(f"{' and '.join(torch_only)}: for the torch runtime (a checkpoint); {args.model} is an "
                             "artifact, which runs at its own precision on its runtime's device. Leave them out.")
    if is_artifact(args.model) and runtime != "torch":
        from ettin_runtime import Artifact

        artifact = Artifact.open(args.model, allow_unverified=args.allow_unverified)
        return artifact.load(None if runtime == "auto" else runtime, max_length=args.max_length)
    if runtime not in ("auto", "torch"):
        raise UsageError(f"--runtime {runtime} needs an artifact folder built by `ettin-export build`.")
    import torch

    from ettin_export.model.torch_reranker import TorchReranker

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[getattr(args, "dtype", "float32")]
    device = torch_device(getattr(args, "device", "cpu"))
    return TorchReranker.from_checkpoint(open_checkpoint(args), dtype=dtype, device=device)


def torch_device(device: str, option: str = "--device") -> str:
    """`device` as torch takes it, on a torch that can reach it; else a UsageError saying what to pass."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise UsageError(f"{option} {device!r} is not a device torch knows; pass cpu or cuda (cuda:N).") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but sees no GPU"
        raise UsageError(f"{option} {device}: this torch ({torch.__version__}) is {build}. Pass {option} cpu, or install "
                         "your CUDA build of torch on a machine with a GPU.")
    return device


def positive_options(args, *names: str, allow_zero: tuple[str, ...] = ()) -> None:
    """Each named integer option, when given, at least 1 (0 for those in `allow_zero`), or a UsageError."""
    for name in names:
        value = getattr(args, name, None)
        least = 0 if name in allow_zero else 1
        if value is not None and value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer of at least {least}; got {value}.")


def checked_output(out: str | Path, *, reads: tuple = ()) -> Path:
    """An output file that may be written: not a folder, not one of the files the command reads, in a
    folder that exists. Checked before any work, so nothing is lost to a bad --out."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; name the file to write into (e.g. {path / 'scores.jsonl'}).")
    for source in reads:
        if source not in (None, "-") and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise UsageError(f"--out {path} is the file the pairs are read from; writing there would destroy it. "
                             "Name another file.")
    if not path.parent.is_dir():
        raise UsageError(f"--out {path}: the folder {path.parent} does not exist; create it or name another file.")
    from ettin_export.staging import unwritable_problem

    problem = unwritable_problem(path, "--out")
    if problem:
        raise UsageError(problem)
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and move it into place: a reader never sees half a
    file, and an interrupted write leaves the old one."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
