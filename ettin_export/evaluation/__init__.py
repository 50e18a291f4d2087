"""Ranking quality of a reranker on a BEIR folder: a BM25 first stage (`bm25`), BEIR's files and TREC run
files (`beir`), and the metrics of reranked candidates (`metrics`). Light to import: bm25s and pytrec_eval
are imported by the functions that need them."""
