"""`ettin-export eval ARTIFACT|MODEL --data BEIR_DIR [--run RUN.trec] [--json]`: ranking quality of a reranker.

Each query's candidates are a first stage's top `--top-k`: a TREC run file's (`--run`) or BM25's over the
corpus (ettin_export.evaluation.bm25). The reranker (the artifact with its own runtime, or a checkpoint's
packed PyTorch model) rescores them, and so does sentence-transformers' CrossEncoder in fp32 when a
checkpoint is at hand (a checkpoint named on the command line; for an artifact the source its manifest
records, when it is a local folder or a random-weights size, or `--reference`), unless `--no-reference`.
NDCG@10, MRR@10 and Recall@k of each, and of the first stage's own order, on the same candidates (trec_eval's
definitions: ettin_export.evaluation.metrics), and how closely the reranker's scores follow CrossEncoder's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ettin_export.commands.common import add_model_arguments
from ettin_export.errors import UsageError
from ettin_export.targets import BF16_RANKS

DEFAULT_TOP_K = 100


def _cutoffs(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas (e.g. 10,100), got {text!r}") \
            from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"each cutoff must be at least 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, allow_artifact=True)
    parser.add_argument("--data", required=True, metavar="BEIR_DIR",
                        help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    parser.add_argument("--split", default="test", help="the qrels file to judge by: qrels/SPLIT.tsv (default: test)")
    parser.add_argument("--run", metavar="RUN.trec",
                        help="the first stage's candidates as a TREC run ('qid Q0 docid rank score tag' lines); "
                             "default: BM25 over the corpus (bm25s, English stopwords, Snowball stemming)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"candidates reranked per query: the first stage's best (default: {DEFAULT_TOP_K})")
    parser.add_argument("--recall-at", type=_cutoffs, metavar="K[,K...]",
                        help="Recall@k cutoffs (default: the --top-k depth)")
    parser.add_argument("--reference", metavar="CHECKPOINT",
                        help="artifact only: the checkpoint CrossEncoder loads (default: the manifest's source, when "
                             "it is a local folder or a random-weights size)")
    parser.add_argument("--no-reference", action="store_true", help="do not run CrossEncoder beside the reranker")
    parser.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "openvino", "tensorrt"],
                        help="artifact only: the runtime to load it with (default: the one its manifest names)")
    parser.add_argument("--device", help="where the models run: cpu or cuda (default: the artifact's own choice; "
                                         "the PyTorch models, the packed model of a checkpoint and CrossEncoder, on cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else)")


def _check_arguments(args) -> None:
    if args.model is None and args.size is None:
        raise UsageError("name the reranker to evaluate: an artifact folder, a checkpoint folder or hub id, or "
                         "--size SIZE [--random-weights].")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1 (got {args.top_k}).")
    if args.no_reference and args.reference:
        raise UsageError("--reference and --no-reference contradict each other; pass one.")


class _CrossEncoder:
    """sentence-transformers' CrossEncoder, fp32, raw scores (identity activation), its own padded batches."""

    def __init__(self, path: str, max_length: int, device: str):
        import torch
        from sentence_transformers import CrossEncoder

        from ettin_export.parity.references import CROSSENCODER_BATCH_SIZE
        from ettin_export.progress import quiet_third_party

        quiet_third_party()
        self.batch_size = CROSSENCODER_BATCH_SIZE
        self.model = CrossEncoder(path, activation_fn=torch.nn.Identity(), device=device, max_length=max_length)

    def predict(self, pairs):
        return self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True)


def _open(args, notes: list[str]):
    """(reranker, its description, the reference checkpoint's path or None, the reference's max length)."""
    from ettin_runtime.artifact import is_artifact

    if is_artifact(args.model):
        from ettin_runtime import Artifact

        if args.size is not None:
            raise UsageError("pass an artifact folder or --size, not both.")
        artifact = Artifact.open(args.model, allow_unverified=args.allow_unverified)
        runtime = artifact.load(None if args.runtime == "auto" else args.runtime, device=args.device or "auto",
                                max_length=args.max_length)
        described = {"kind": "artifact", "artifact": str(args.model), "runtime": type(runtime).__name__,
                     "precision": artifact.precision, "target": artifact.target, "source": artifact.source.model}
        name = f"{type(runtime).__name__} ({artifact.precision} artifact)"
        max_length = args.max_length or artifact.max_length
        return runtime, name, described, _artifact_reference(args, artifact, notes), max_length
    if args.reference:
        raise UsageError("--reference is for artifacts; for a checkpoint CrossEncoder runs that checkpoint.")
    if args.runtime != "auto":
        raise UsageError(f"--runtime {args.runtime} needs an artifact folder built by `ettin-export build`.")
    import torch

    from ettin_export.commands.common import open_checkpoint
    from ettin_export.model.torch_reranker import TorchReranker

    checkpoint = open_checkpoint(args)
    reranker = TorchReranker.from_checkpoint(checkpoint, dtype=torch.float32, device=args.device or "cpu")
    described = {"kind": "checkpoint", "checkpoint": checkpoint.source, "runtime": "TorchReranker",
                 "precision": "fp32", "random_weights": checkpoint.random_weights}
    reference = None if args.no_reference else str(checkpoint.path)
    return reranker, "packed PyTorch fp32 (TorchReranker)", described, reference, checkpoint.max_length


def _artifact_reference(args, artifact, notes: list[str]) -> str | None:
    if args.no_reference:
        return None
    source = artifact.source
    if not args.reference and not source.random_size and not (source.model and Path(source.model).is_dir()):
        notes.append(f"CrossEncoder not run: the artifact's source {source.model!r} is not a local folder (pass "
                     "--reference CHECKPOINT to compare with it)")
        return None
    try:
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        notes.append(f"CrossEncoder not run: {error} (pip install \"ettin-export[export]\")")
        return None
    from ettin_export.commands.verify import resolve_reference

    return str(resolve_reference(artifact, args.reference).path)


def _progress(steps, quiet: bool):
    """A rich progress bar on the command's stderr console, one task per scored system."""
    import contextlib

    if quiet:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=steps.console)


def _libraries_first(bm25: bool) -> None:
    """Refuse a missing metric (or BM25) library before any reading or model loading, with its pip line."""
    from ettin_export.evaluation import bm25, metrics

    metrics._pytrec_eval()
    if bm25:
        bm25._libraries()


def run(args) -> int:
    from ettin_export.evaluation.beir import load_beir, read_run
    from ettin_export.evaluation.bm25 import BM25_SETTINGS
    from ettin_export.evaluation.metrics import metric_names
    from ettin_export.evaluation.rerank import System, evaluate, first_stage_candidates
    from ettin_export.progress import Steps

    _check_arguments(args)
    _libraries_first(bm25=not args.run)
    started = time.perf_counter()
    recall_at = args.recall_at or [args.top_k]
    steps = Steps(f"ettin-export eval {args.model or args.size} --data {args.data}", quiet=args.json)
    with steps.step(f"reading {args.data} (qrels/{args.split}.tsv)" + (f" and {args.run}" if args.run else "")):
        data = load_beir(args.data, args.split)
        run_candidates = read_run(args.run, data) if args.run else None
    notes = list(data.notes)
    skipped = len(data.queries) - len(data.qrels)
    steps.note(f"{len(data.corpus)} documents, {len(data.queries)} queries: {len(data.qrels)} with qrels evaluated, "
               f"{skipped} without skipped")
    first_stage = f"TREC run {Path(args.run).name}" if args.run else "BM25 (bm25s)"
    if args.run or args.json:
        with steps.step(f"first stage: {first_stage}, top {args.top_k} per query"):
            candidates = first_stage_candidates(data, args.top_k, run_candidates)
    else:  # a bar, not a step: rich shows one live display at a time (a step's spinner is one)
        with _progress(steps, False) as bar:
            task = bar.add_task(f"first stage: {first_stage}, top {args.top_k}", total=len(data.qrels), unit="queries")
            candidates = first_stage_candidates(data, args.top_k, progress=lambda done, _: bar.update(task, completed=done))
    empty = sum(1 for scored in candidates.values() if not scored)
    if empty:
        notes.append(f"{empty} evaluated queries have no candidates (they count with 0 for every metric)")
    with steps.step("loading the reranker" + ("" if args.no_reference else " (and CrossEncoder, if at hand)")):
        reranker, name, described, reference_path, max_length = _open(args, notes)
        systems = [System("reranker", name, reranker.predict)]
        if reference_path is not None:
            reference = _CrossEncoder(reference_path, max_length, args.device or "cpu")
            systems.append(System("crossencoder", "sentence-transformers CrossEncoder fp32", reference.predict))
    try:
        with _progress(steps, args.json) as bar:
            def progress(system, total):
                if bar is None:
                    return None
                task = bar.add_task(f"scoring with {system.name}", total=total, unit="pairs")
                return lambda pairs: bar.advance(task, pairs)

            ties = BF16_RANKS["tie_bits"] if described.get("precision") == "bf16" else None  # as its gate judges
            report = evaluate(data, candidates, systems, recall_at, first_stage_name=first_stage, progress=progress,
                              tie_bits=ties)
    finally:
        reranker.close()
    report.pop("scores")
    report.pop("owners")
    report["first_stage"].update({"kind": "run" if args.run else "bm25", "top_k": args.top_k,
                                  **({"run": str(args.run)} if args.run else {"settings": BM25_SETTINGS})})
    report["reranker"]["model"] = described
    report.setdefault("crossencoder", None)
    if report["crossencoder"] is not None:
        report["crossencoder"]["checkpoint"] = reference_path
    report.setdefault("agreement", None)
    output = {"data": {"dir": str(args.data), "split": args.split, **data.counts()}, **report, "notes": notes,
              "seconds": round(time.perf_counter() - started, 3)}
    if args.json:
        sys.stdout.write(json.dumps(output, indent=2) + "\n")
        return 0
    for note in notes:
        steps.note(note)
    _print_table(output, metric_names(recall_at))
    steps.done("evaluated")
    return 0


def _print_table(output: dict, names: list[str]) -> None:
    rows = [("first stage: " + output["first_stage"]["name"], output["first_stage"]),
            ("reranker: " + output["reranker"]["name"], output["reranker"])]
    if output["crossencoder"]:
        rows.append(("CrossEncoder fp32 (PyTorch)", output["crossencoder"]))
    width = max(len(label) for label, _ in rows)
    print(f"{output['evaluated_queries']} queries evaluated ({output['skipped_queries_no_qrels']} without qrels "
          f"skipped), {output['pairs']} candidate pairs (top {output['first_stage']['top_k']} per query)")
    print(f"{'':<{width}}  " + "  ".join(f"{name:>10}" for name in names))
    for label, values in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{values[name]:>10.4f}" for name in names))
    agreement = output.get("agreement")
    if agreement:
        top1 = _tied(agreement, "top1_agreement", lambda v: f"{100 * v:.1f} %")
        top10 = _tied(agreement, "top10_overlap", lambda v: f"{v:.3f}")
        print(f"reranker vs CrossEncoder: Spearman {agreement['spearman']:.6f} over {agreement['pairs']} pairs, "
              f"top-1 agreement {100 * agreement['top1_agreement']:.1f} %{top1} and top-10 overlap "
              f"{agreement['top10_overlap']:.3f}{top10} over {agreement['queries']} queries, max |delta| "
              f"{agreement['max_abs_diff']:.3g}")

def _tied(agreement: dict, name: str, form) -> str:
    """' (x up to bf16 ties)' where the agreement has the tie-aware figure (a bf16 artifact)."""
    tied = agreement.get(f"{name}_tied")
    return "" if tied is None else f" ({form(tied)} up to bf16 ties)"
