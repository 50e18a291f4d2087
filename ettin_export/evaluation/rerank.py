"""Rerank each query's first-stage candidates and measure the rankings: the work of `ettin-export eval`,
without the command line (a reranker here is anything with `predict(pairs) -> scores`).

The candidates of a query are the first stage's top `top_k` (BM25, or a TREC run's best by score), in
the first stage's order. Each system scores the same (query, document) pairs, the document being
`(title + " " + text).strip()`; a ranking is its scores in descending order, equal scores by doc id
(`metrics.ranked`). Only queries with qrels are scored and measured (BEIR's rule).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ettin_export.evaluation.beir import BeirData, DataError
from ettin_export.evaluation.metrics import mean_metrics, metric_names, ranked

CHUNK_PAIRS = 256  # pairs per predict call: what the progress bar advances by


@dataclass
class System:
    """A reranker to measure: `key` names it in the report ("reranker", "crossencoder")."""

    key: str
    name: str
    predict: Callable[[list[tuple[str, str]]], np.ndarray]


def first_stage_candidates(data: BeirData, top_k: int, run: Mapping[str, Sequence[tuple[str, float]]] | None = None,
                           progress: Callable[[int, int], None] | None = None) -> dict[str, list[tuple[str, float]]]:
    """Every evaluated query's candidates, best first, at most top_k: the run's when given (its best by
    score), else BM25's over the corpus (`bm25.bm25_candidates`)."""
    query_ids = data.evaluated_query_ids
    if run is None:
        from ettin_export.evaluation.beir import document_text
        from ettin_export.evaluation.bm25 import bm25_candidates

        corpus = {doc_id: document_text(doc) for doc_id, doc in data.corpus.items()}
        candidates = bm25_candidates({q: data.queries[q] for q in query_ids}, corpus, top_k, progress=progress)
    else:
        candidates = {}
        for query_id in query_ids:
            scores = dict(run.get(query_id, ()))
            candidates[query_id] = [(doc_id, scores[doc_id]) for doc_id in ranked(scores.items())[:top_k]]
    if not any(candidates.values()):
        where = "the run file has none for them" if run is not None else "BM25 found no document sharing a term " \
                                                                          "with any of them"
        raise DataError(f"no candidates to rerank: {len(query_ids)} queries have qrels, and {where}. Check that the "
                        "run (or the corpus) belongs to these queries.")
    return candidates


def candidate_pairs(data: BeirData, candidates: Mapping[str, Sequence[tuple[str, float]]]):
    """(pairs, owners): the (query, document) pairs of every candidate list in order, and for each pair its
    (query id, doc id)."""
    pairs, owners = [], []
    for query_id, scored in candidates.items():
        query = data.queries[query_id]
        for doc_id, _ in scored:
            pairs.append((query, data.document(doc_id)))
            owners.append((query_id, doc_id))
    return pairs, owners


def write_gate_pairs(data: BeirData, candidates: Mapping[str, Sequence[tuple[str, float]]], queries: int, path):
    """The first `queries` evaluated queries, each with its candidates, as a `build --parity-pairs` file
    ({"query", "document"} lines grouped by query): a gate on pairs like the traffic. Returns the path."""
    import json
    from pathlib import Path

    path = Path(path)
    with path.open("w") as handle:
        for query_id in data.evaluated_query_ids[:queries]:
            for doc_id, _ in candidates[query_id]:
                handle.write(json.dumps({"query": data.queries[query_id], "document": data.document(doc_id)}) + "\n")
    return path


def score(system: System, pairs: list[tuple[str, str]], advance: Callable[[int], None] | None = None) -> np.ndarray:
    scores = []
    for start in range(0, len(pairs), CHUNK_PAIRS):
        chunk = pairs[start:start + CHUNK_PAIRS]
        values = np.asarray(system.predict(chunk), dtype=np.float64).reshape(-1)
        if len(values) != len(chunk):
            raise RuntimeError(f"{system.name} returned {len(values)} scores for {len(chunk)} pairs")
        scores.append(values)
        if advance is not None:
            advance(len(chunk))
    return np.concatenate(scores) if scores else np.zeros(0)


def rankings_of(owners: Sequence[tuple[str, str]], scores: np.ndarray, query_ids) -> dict[str, list[str]]:
    scored: dict[str, list[tuple[str, float]]] = {query_id: [] for query_id in query_ids}
    for (query_id, doc_id), value in zip(owners, scores):
        scored[query_id].append((doc_id, float(value)))
    return {query_id: ranked(items) for query_id, items in scored.items()}


def agreement(owners: Sequence[tuple[str, str]], reference: np.ndarray, candidate: np.ndarray,
              tie_bits: int | None = None) -> dict:
    """The artifact's scores against CrossEncoder's on the same pairs: the numbers the int8/bf16 gates use
    (Spearman over all pairs, top-1 agreement and top-10 overlap per query, max |delta|). With `tie_bits`
    (a bf16 artifact: 8) also top-1 / top-10 up to ties within one ulp at that precision, as its gate
    judges them (`..._tied`)."""
    from ettin_export.parity.rule import ParityMetrics

    spans, start = [], 0
    for end in range(1, len(owners) + 1):
        if end == len(owners) or owners[end][0] != owners[start][0]:
            spans.append(slice(start, end))
            start = end
    metrics = ParityMetrics.compute(reference, candidate, spans)
    out = {"pairs": metrics.pairs, "queries": metrics.queries, "spearman": metrics.spearman,
           "top1_agreement": metrics.top1_agreement, "top10_overlap": metrics.top10_overlap,
           "max_abs_diff": metrics.max_abs_diff, "mean_abs_diff": metrics.mean_abs_diff}
    if tie_bits is not None:
        tied = ParityMetrics.compute(reference, candidate, spans, tie_bits)
        out.update(tie_bits=tie_bits, top1_agreement_tied=tied.top1_agreement, top10_overlap_tied=tied.top10_overlap)
    return out


def evaluate(data: BeirData, candidates: Mapping[str, Sequence[tuple[str, float]]], systems: Sequence[System],
             recall_at: Sequence[int], first_stage_name: str = "first stage",
             progress: Callable[[System, int], Callable[[int], None]] | None = None,
             tie_bits: int | None = None) -> dict:
    """The report: counts, then the first stage's and each system's metrics on the same candidates, and
    the agreement of "reranker" with "crossencoder" when both ran (`tie_bits`: see `agreement`).
    `progress(system, pairs)` returns the callback that system's scoring advances by the pairs of each chunk."""
    query_ids = data.evaluated_query_ids
    qrels = {query_id: data.qrels[query_id] for query_id in query_ids}
    pairs, owners = candidate_pairs(data, {q: candidates.get(q, []) for q in query_ids})
    if not pairs:
        raise DataError("no candidates to rerank: every evaluated query's candidate list is empty.")
    report: dict = {
        "evaluated_queries": len(query_ids),
        "skipped_queries_no_qrels": len(data.queries) - len(query_ids),
        "queries_without_candidates": sum(1 for q in query_ids if not candidates.get(q)),
        "pairs": len(pairs),
        "recall_at": list(recall_at),
        "metrics": metric_names(recall_at),
        "first_stage": {"name": first_stage_name,
                        **mean_metrics(qrels, {q: [d for d, _ in candidates.get(q, [])] for q in query_ids},
                                       recall_at)},
    }
    scores = {}
    for system in systems:
        start = time.perf_counter()
        scores[system.key] = score(system, pairs, progress(system, len(pairs)) if progress else None)
        seconds = time.perf_counter() - start
        report[system.key] = {"name": system.name,
                              **mean_metrics(qrels, rankings_of(owners, scores[system.key], query_ids), recall_at),
                              "seconds": round(seconds, 3)}
    if "reranker" in scores and "crossencoder" in scores:
        report["agreement"] = agreement(owners, scores["crossencoder"], scores["reranker"], tie_bits)
    report["scores"] = scores  # the raw scores, pair order = `owners` (the command drops them from its JSON)
    report["owners"] = owners
    return report
