"""A BM25 first stage with `bm25s`, fixed so that two machines give the same candidates.

`bm25_candidates(queries, corpus, k)`: query id -> [(doc id, BM25 score)], best first, at most `k` each.

The setting (also in `BM25_SETTINGS`, which `eval --json` reports):

- tokens: bm25s' tokenizer, lower-cased, the scikit-learn token pattern `(?u)\\b\\w\\w+\\b` (words of two or
  more word characters), bm25s' English stopword list (NLTK's) removed, then the Snowball English stemmer
  of PyStemmer. PyStemmer is required rather than used when present: the candidates must not depend on
  what happens to be installed.
- scoring: bm25s' `lucene` variant (Lucene's BM25 IDF, `log(1 + (N - df + 0.5) / (df + 0.5))`),
  k1 = 1.5, b = 0.75, the scores in float32.
- candidates: only documents sharing at least one term with the query (score > 0), as Lucene returns them;
  a query of stopwords only, or of words no document has, gets no candidates.
- ties: equal scores are ordered by doc id (ascending string order), so the top k is deterministic.

A document is indexed as `title + " " + text`, stripped (the text BEIR's retrievers and rerankers see):
pass the corpus already joined (`corpus_texts` in `ettin_export.evaluation.beir` does it).
"""

from __future__ import annotations

import numpy as np

from ettin_export.errors import MissingDependency, UsageError

BM25S_REQUIREMENT = "bm25s>=0.2"
PYSTEMMER_REQUIREMENT = "PyStemmer>=2.2"

BM25_SETTINGS = {
    "library": "bm25s",
    "method": "lucene",
    "k1": 1.5,
    "b": 0.75,
    "lower": True,
    "token_pattern": r"(?u)\b\w\w+\b",
    "stopwords": "en (bm25s' English list)",
    "stemmer": "PyStemmer Snowball english",
    "candidates": "score > 0 only",
    "ties": "doc id ascending",
}


def _libraries():
    try:
        import bm25s
    except ImportError as error:
        raise MissingDependency(
            f"the BM25 first stage needs bm25s, which is not installed ({error}): "
            f'pip install "{BM25S_REQUIREMENT}" "{PYSTEMMER_REQUIREMENT}"  (or: pip install "ettin-export[eval]")'
        ) from None
    try:
        import Stemmer
    except ImportError as error:
        raise MissingDependency(
            f"the BM25 first stage stems with PyStemmer, which is not installed ({error}): "
            f'pip install "{PYSTEMMER_REQUIREMENT}"  (or: pip install "ettin-export[eval]")'
        ) from None
    return bm25s, Stemmer


def _tokenize(bm25s, stemmer, texts: list[str]) -> list[list[str]]:
    tokens = bm25s.tokenize(texts, lower=True, token_pattern=BM25_SETTINGS["token_pattern"], stopwords="en",
                            stemmer=stemmer, return_ids=False, show_progress=False)
    return [[token for token in doc if token] for doc in tokens]


def top_k(doc_ids: list[str], scores: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The k best of `scores` (> 0 only), best first, equal scores by doc id: one rule for every first stage."""
    positive = np.flatnonzero(scores > 0)
    if len(positive) > k:
        # Everything at or above the k-th best score, so that ties at the boundary are settled by doc id.
        threshold = np.partition(scores[positive], len(positive) - k)[len(positive) - k]
        positive = positive[scores[positive] >= threshold]
    ranked = sorted(((doc_ids[i], float(scores[i])) for i in positive), key=lambda item: (-item[1], item[0]))
    return ranked[:k]


def bm25_candidates(queries: dict[str, str], corpus: dict[str, str], k: int,
                    progress=None) -> dict[str, list[tuple[str, float]]]:
    """query id -> [(doc id, BM25 score)], best first, at most k: the setting in this module's docstring.
    `corpus` maps doc id -> the text to index (title + " " + text, stripped); `progress(done, total)` is
    called after each query when given. Every query id is in the result (an empty list: no candidates)."""
    if k < 1:
        raise UsageError(f"the number of BM25 candidates must be at least 1 (got {k}).")
    if not corpus:
        raise UsageError("the corpus is empty: BM25 has no documents to rank.")
    bm25s, Stemmer = _libraries()
    stemmer = Stemmer.Stemmer("english")
    doc_ids = list(corpus)
    retriever = bm25s.BM25(method=BM25_SETTINGS["method"], k1=BM25_SETTINGS["k1"], b=BM25_SETTINGS["b"])
    retriever.index(_tokenize(bm25s, stemmer, [corpus[d] for d in doc_ids]), show_progress=False)
    query_ids = list(queries)
    query_tokens = _tokenize(bm25s, stemmer, [queries[q] for q in query_ids])
    results: dict[str, list[tuple[str, float]]] = {}
    for done, (query_id, tokens) in enumerate(zip(query_ids, query_tokens), 1):
        ids = [i for i in retriever.get_tokens_ids(tokens)]
        if ids:
            scores = np.asarray(retriever.get_scores_from_ids(ids), dtype=np.float64)
            results[query_id] = top_k(doc_ids, scores, k)
        else:
            results[query_id] = []
        if progress is not None:
            progress(done, len(query_ids))
    return results
