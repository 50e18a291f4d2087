"""NDCG@10, MRR@10 and Recall@k of rankings, computed by trec_eval itself (pytrec_eval, the bindings BEIR's
own `EvaluateRetrieval.evaluate` uses), and the one ordering rule every ranking here follows.

- Order: score descending, equal scores by doc id ascending (string order). trec_eval breaks ties the
  other way (doc id descending) and ignores a run's rank column, so the library is handed each ranking
  with its position as the score (n, n-1, ..., 1): it measures exactly our order, with no tie left to it.
- NDCG@10: trec_eval's `ndcg_cut.10`: gain = the grade (linear), discount log2(rank + 1), the ideal from
  all of the query's judged documents (also those no candidate list holds).
- MRR@10: trec_eval's `recip_rank` on the ranking cut at 10: 1 / rank of the first document with grade > 0
  in the top 10, else 0.
- Recall@k: trec_eval's `recall.k`: relevant (grade > 0) documents in the top k / all relevant documents
  judged for the query (a query with none: 0).
- Means over the evaluated queries, that is every query with qrels (BEIR's rule): a query whose candidate
  list is empty counts with 0 for every metric (trec_eval's -c).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ettin_export.errors import MissingDependency

PYTREC_EVAL_REQUIREMENT = "pytrec-eval-terrier>=0.5.6"
MRR_CUTOFF = 10
NDCG_CUTOFF = 10


def ranked(scored: Iterable[tuple[str, float]]) -> list[str]:
    """Doc ids best first: score descending, equal scores by doc id ascending."""
    return [doc_id for doc_id, _ in sorted(scored, key=lambda item: (-float(item[1]), item[0]))]


def metric_names(recall_at: Sequence[int]) -> list[str]:
    return [f"ndcg@{NDCG_CUTOFF}", f"mrr@{MRR_CUTOFF}", *(f"recall@{k}" for k in recall_at)]


def _pytrec_eval():
    try:
        import pytrec_eval
    except ImportError as error:
        raise MissingDependency(
            f"the ranking metrics are trec_eval's, through pytrec_eval, which is not installed ({error}): "
            f'pip install "{PYTREC_EVAL_REQUIREMENT}"  (or: pip install "ettin-export[eval]")'
        ) from None
    return pytrec_eval


def per_query_metrics(qrels: Mapping[str, Mapping[str, int]], rankings: Mapping[str, Sequence[str]],
                      recall_at: Sequence[int]) -> dict[str, dict[str, float]]:
    """query id -> metric name -> value, for every query of `qrels` (a query `rankings` lacks: all 0).
    `rankings` holds doc ids best first (`ranked`)."""
    pytrec_eval = _pytrec_eval()
    qrels = {query_id: {doc_id: int(grade) for doc_id, grade in judged.items()} for query_id, judged in qrels.items()}

    def as_run(cutoff: int | None) -> dict[str, dict[str, float]]:
        run = {}
        for query_id in qrels:
            docs = list(rankings.get(query_id, ()))[:cutoff]
            run[query_id] = {doc_id: float(len(docs) - position) for position, doc_id in enumerate(docs)}
        return run

    full = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{NDCG_CUTOFF}", *(f"recall.{k}" for k in recall_at)})
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    by_query_full, by_query_mrr = full.evaluate(as_run(None)), mrr.evaluate(as_run(MRR_CUTOFF))
    results = {}
    for query_id in qrels:
        measured, reciprocal = by_query_full.get(query_id, {}), by_query_mrr.get(query_id, {})
        values = {f"ndcg@{NDCG_CUTOFF}": measured.get(f"ndcg_cut_{NDCG_CUTOFF}", 0.0),
                  f"mrr@{MRR_CUTOFF}": reciprocal.get("recip_rank", 0.0)}
        values.update({f"recall@{k}": measured.get(f"recall_{k}", 0.0) for k in recall_at})
        results[query_id] = values
    return results


def mean_metrics(qrels: Mapping[str, Mapping[str, int]], rankings: Mapping[str, Sequence[str]],
                 recall_at: Sequence[int]) -> dict[str, float]:
    """The metrics averaged over every query of `qrels` (metric_names order)."""
    by_query = per_query_metrics(qrels, rankings, recall_at)
    names = metric_names(recall_at)
    if not by_query:
        return {name: 0.0 for name in names}
    return {name: sum(values[name] for values in by_query.values()) / len(by_query) for name in names}
