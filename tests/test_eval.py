"""`ettin-export eval`: BEIR reading, the BM25 first stage, trec_eval's metrics against hand-computed values,
the tie rule, rerankers that rank perfectly and backwards, bad inputs, and one end-to-end run of the CLI on
a tiny random-weights artifact (with CrossEncoder beside it)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from ettin_export.cli import main
from ettin_export.evaluation.beir import DataError, load_beir, read_run
from ettin_export.evaluation.bm25 import bm25_candidates, top_k
from ettin_export.evaluation.metrics import mean_metrics, per_query_metrics, ranked
from ettin_export.evaluation.rerank import System, evaluate, first_stage_candidates
from ettin_runtime.errors import MissingDependency

CORPUS = [
    {"_id": "d1", "title": "Solar power", "text": "Solar panels convert sunlight into electricity."},
    {"_id": "d2", "title": "Wind power", "text": "Wind turbines generate electricity from moving air."},
    {"_id": "d3", "title": "", "text": "Cats sleep most of the day and hunt at night."},
    {"_id": "d4", "title": "Dogs", "text": "Dogs are loyal animals that love running in parks."},
    {"_id": "d5", "text": "Running shoes help runners run longer distances."},
    {"_id": "d6", "title": "Baking", "text": "Bread rises because yeast produces carbon dioxide."},
]
QUERIES = [
    {"_id": "q1", "text": "how do solar panels make electricity"},
    {"_id": "q2", "text": "when do cats hunt"},
    {"_id": "q3", "text": "dogs running"},
    {"_id": "q4", "text": "a query without judgements"},
]
QRELS = [("q1", "d1", 2), ("q1", "d2", 1), ("q2", "d3", 1), ("q3", "d4", 1), ("q3", "d5", 0)]
RUN = {"q1": ["d1", "d2", "d3", "d4"], "q2": ["d1", "d3", "d5"], "q3": ["d4", "d5", "d6"]}


def write_beir(root, corpus=CORPUS, queries=QUERIES, qrels=QRELS):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(query) + "\n" for query in queries))
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels))
    return root


def write_run(path, run=RUN):
    lines = [f"{q} Q0 {d} {rank} {10.0 - rank} first" for q, docs in run.items() for rank, d in enumerate(docs, 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "beir")


def dcg(grades):
    return sum(grade / math.log2(rank + 1) for rank, grade in enumerate(grades, 1))


# --- reading ------------------------------------------------------------------------------------------------

def test_beir_folder_as_beir_reads_it(beir):
    data = load_beir(beir)
    assert data.evaluated_query_ids == ["q1", "q2", "q3"]  # q4 has no qrels: skipped, as BEIR does
    assert data.counts()["queries_skipped_no_qrels"] == 1
    assert data.qrels["q3"] == {"d4": 1, "d5": 0}
    assert data.document("d1") == "Solar power Solar panels convert sunlight into electricity."
    assert data.document("d3") == "Cats sleep most of the day and hunt at night."  # empty title: stripped
    assert data.document("d5") == "Running shoes help runners run longer distances."  # no title


def test_run_file_order_is_by_score_then_doc_id(beir, tmp_path):
    data = load_beir(beir)
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d2 1 1.5 x\nq1 Q0 d4 2 3.0 x\nq1 Q0 d1 3 1.5 x\nq2 Q0 d3 1 0 x\n")
    run = read_run(path, data)
    candidates = first_stage_candidates(data, 2, run)
    assert candidates["q1"] == [("d4", 3.0), ("d1", 1.5)]  # tie at 1.5: d1 before d2; cut at 2
    assert candidates["q3"] == []


# --- BM25 ---------------------------------------------------------------------------------------------------

def test_bm25_candidates_stem_drop_stopwords_and_match_only():
    corpus = {"a": "Dogs are running in the park", "b": "A cat runs", "c": "Bread and butter", "d": "the of and"}
    found = bm25_candidates({"q": "running dog", "s": "the and of", "z": "zebra"}, corpus, 10)
    assert [doc for doc, _ in found["q"]] == ["a", "b"]  # "runs"/"running" share a stem; c and d share nothing
    assert found["q"][0][1] > found["q"][1][1] > 0
    assert found["s"] == [] and found["z"] == []  # stopwords only; no known term
    assert bm25_candidates({"q": "running dog"}, corpus, 1) == {"q": found["q"][:1]}


def test_bm25_ties_by_doc_id_at_the_cut():
    scores = np.array([1.0, 2.0, 1.0, 1.0, 0.0])
    assert top_k(["e", "d", "c", "b", "a"], scores, 3) == [("d", 2.0), ("b", 1.0), ("c", 1.0)]
    assert top_k(["e", "d", "c", "b", "a"], scores, 10) == [("d", 2.0), ("b", 1.0), ("c", 1.0), ("e", 1.0)]


# --- metrics against hand-computed values ------------------------------------------------------------------

def test_metrics_equal_hand_computed_values():
    qrels = {"q1": {"d1": 2, "d2": 1, "d9": 0}, "q2": {"d3": 1}, "q3": {"d4": 1, "d5": 1, "d6": 1}}
    rankings = {"q1": ["d2", "d3", "d1"], "q2": ["d1", "d2", "d3"], "q3": []}
    by_query = per_query_metrics(qrels, rankings, [2, 3])
    ndcg_q1 = dcg([1, 0, 2]) / dcg([2, 1])  # (1/log2 2 + 2/log2 4) / (2/log2 2 + 1/log2 3)
    assert ndcg_q1 == pytest.approx(2 / (2 + 1 / math.log2(3)))
    assert by_query["q1"] == pytest.approx({"ndcg@10": ndcg_q1, "mrr@10": 1.0, "recall@2": 0.5, "recall@3": 1.0})
    assert by_query["q2"] == pytest.approx({"ndcg@10": 1 / math.log2(4), "mrr@10": 1 / 3, "recall@2": 0.0,
                                            "recall@3": 1.0})
    assert by_query["q3"] == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@2": 0.0, "recall@3": 0.0}  # no candidates
    means = mean_metrics(qrels, rankings, [2, 3])
    assert means == pytest.approx({"ndcg@10": (ndcg_q1 + 0.5) / 3, "mrr@10": (1 + 1 / 3) / 3,
                                   "recall@2": 0.5 / 3, "recall@3": 2 / 3})


def test_cutoffs_at_ten():
    qrels = {"q": {"r": 1}}
    ranking = [f"n{i:02d}" for i in range(10)] + ["r"]  # the relevant document 11th
    assert per_query_metrics(qrels, {"q": ranking}, [10, 11])["q"] == pytest.approx(
        {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@10": 0.0, "recall@11": 1.0})
    assert per_query_metrics(qrels, {"q": ranking[1:]}, [10])["q"] == pytest.approx(
        {"ndcg@10": 1 / math.log2(11), "mrr@10": 0.1, "recall@10": 1.0})


def test_ties_are_ours_not_trec_evals():
    """Equal scores rank by doc id ascending; trec_eval alone would put "b" first (doc id descending)."""
    assert ranked([("b", 1.0), ("a", 1.0), ("c", 2.0)]) == ["c", "a", "b"]
    qrels = {"q": {"a": 1}}
    assert per_query_metrics(qrels, {"q": ranked([("a", 1.0), ("b", 1.0)])}, [1])["q"]["mrr@10"] == 1.0
    qrels = {"q": {"b": 1}}
    assert per_query_metrics(qrels, {"q": ranked([("a", 1.0), ("b", 1.0)])}, [1])["q"]["mrr@10"] == 0.5


# --- rerankers that rank perfectly and backwards ------------------------------------------------------------

class GradeReranker:
    """Scores a pair by its qrels grade (times `sign`), 0 when unjudged: a stub with `predict(pairs)`."""

    def __init__(self, data, sign=1.0):
        by_text = {data.queries[q]: q for q in data.queries}
        docs = {data.document(d): d for d in data.corpus}
        self.lookup = lambda query, doc: sign * data.qrels.get(by_text[query], {}).get(docs[doc], 0)

    def predict(self, pairs):
        return np.array([self.lookup(query, doc) for query, doc in pairs], dtype=np.float32)


def test_a_reranker_that_puts_the_relevant_first_gets_mrr_one_and_one_that_reverses_less(beir, tmp_path):
    data = load_beir(beir)
    candidates = first_stage_candidates(data, 100, read_run(write_run(tmp_path / "run.trec"), data))
    systems = [System("reranker", "grades", GradeReranker(data).predict),
               System("crossencoder", "reversed", GradeReranker(data, -1.0).predict)]
    report = evaluate(data, candidates, systems, [2], first_stage_name="run")
    assert report["evaluated_queries"] == 3 and report["skipped_queries_no_qrels"] == 1 and report["pairs"] == 10
    assert report["reranker"]["mrr@10"] == 1.0 and report["reranker"]["ndcg@10"] == pytest.approx(1.0)
    assert report["reranker"]["recall@2"] == pytest.approx(1.0)
    # Reversed: the zero-grade candidates come first (by doc id), then the relevant ones, worst first:
    # q1 d3 d4 d2 d1, q2 d1 d5 d3, q3 d5 d6 d4 -- the first relevant document third everywhere.
    reversed_ = report["crossencoder"]
    assert reversed_["mrr@10"] == pytest.approx(1 / 3)
    ndcg_q1 = dcg([0, 0, 1, 2]) / dcg([2, 1])
    assert reversed_["ndcg@10"] == pytest.approx((ndcg_q1 + 0.5 + 0.5) / 3)
    assert reversed_["recall@2"] == 0.0
    # The run's own order: q1 d1 d2 (perfect), q2 d1 d3 (rank 2), q3 d4 first.
    assert report["first_stage"]["mrr@10"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert report["agreement"]["spearman"] == pytest.approx(-1.0)
    assert report["agreement"]["top1_agreement"] == 0.0


def test_a_bf16_artifacts_agreement_is_also_given_up_to_bf16_ties(capsys):
    """For a bf16 artifact `eval` reports top-1 / top-10 agreement both strictly and as its gate judges them
    (up to ties within one bf16 ulp of the query's top score); other precisions strictly only."""
    from ettin_export.commands.eval import _print_table
    from ettin_export.evaluation.rerank import agreement

    rng = np.random.default_rng()
    queries = 12
    owners = [(f"q{q}", f"d{d}") for q in range(queries) for d in range(15)]
    reference = np.minimum(rng.normal(0, 2, len(owners)), 4.0)
    reference[::15] = 5.0  # each query's best at 5 (one bf16 ulp there: 2^-5)
    candidate = reference.copy()
    candidate[1::15] = 5.0 - 0.01  # the runner-up 0.01 below the best (within the ulp) ...
    reference[1::15] = 5.0 - 0.01
    for start in range(0, len(owners), 15)[:3]:  # ... and in 3 queries the candidate puts it first
        candidate[start], candidate[start + 1] = candidate[start + 1], candidate[start]
    strict = agreement(owners, reference, candidate)
    assert strict["top1_agreement"] == pytest.approx(9 / 12) and "top1_agreement_tied" not in strict
    tied = agreement(owners, reference, candidate, tie_bits=8)
    assert tied["top1_agreement"] == strict["top1_agreement"] and tied["top1_agreement_tied"] == 1.0
    assert tied["tie_bits"] == 8 and tied["top10_overlap_tied"] >= tied["top10_overlap"]
    far = candidate.copy()
    far[2::15] = 9.0  # the candidate's pick a document the reference scores far below its best: no tie
    assert agreement(owners, reference, far, tie_bits=8)["top1_agreement_tied"] == 0.0
    output = {"evaluated_queries": queries, "skipped_queries_no_qrels": 0, "pairs": len(owners),
              "first_stage": {"name": "run", "top_k": 15, "ndcg@10": 0.5},
              "reranker": {"name": "bf16 artifact", "ndcg@10": 0.6}, "crossencoder": None, "agreement": tied}
    _print_table(output, ["ndcg@10"])
    assert "top-1 agreement 75.0 % (100.0 % up to bf16 ties)" in capsys.readouterr().out


# --- bad input ----------------------------------------------------------------------------------------------

def refusal(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_files_are_named(tmp_path, capsys):
    (tmp_path / "beir").mkdir()
    (tmp_path / "beir" / "corpus.jsonl").write_text(json.dumps(CORPUS[0]) + "\n")
    err = refusal(capsys, ["eval", "--size", "17m", "--random-weights", "--data", str(tmp_path / "beir")])
    assert "lacks queries.jsonl, qrels/test.tsv" in err and "A BEIR folder holds" in err
    err = refusal(capsys, ["eval", "--size", "17m", "--random-weights", "--data", str(tmp_path / "nothing")])
    assert "no such folder" in err


def test_wrong_split_names_the_splits_there(beir, capsys):
    err = refusal(capsys, ["eval", "--size", "17m", "--data", str(beir), "--split", "dev"])
    assert "lacks qrels/dev.tsv" in err and "splits found: test" in err


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"title": "no id", "text": "x"}', 'no "_id" string'),
    ('{"_id": "d7", "text": 3}', '"text" must be a string'),
    ('{"_id": "d1", "text": "again"}', "already used"),
])
def test_malformed_corpus_lines_give_file_and_line(tmp_path, line, message):
    root = write_beir(tmp_path / "beir")
    with open(root / "corpus.jsonl", "a") as stream:
        stream.write(line + "\n")
    with pytest.raises(DataError, match=message) as error:
        load_beir(root)
    assert f"corpus.jsonl:{len(CORPUS) + 1}:" in str(error.value)


def test_qrels_with_no_overlap_and_bad_lines(tmp_path):
    root = write_beir(tmp_path / "a", qrels=[("x1", "d1", 1), ("x2", "d2", 1)])
    with pytest.raises(DataError, match="none of its 2 judgements names a query.*no overlap"):
        load_beir(root)
    root = write_beir(tmp_path / "b", qrels=[("q1", "d1", "high")])
    with pytest.raises(DataError, match=r"test.tsv:2: the score 'high' is not an integer"):
        load_beir(root)


@pytest.mark.parametrize(("run", "message"), [
    ("q1 Q0 d1 1 2.0 x\nq1 Q0 nope 2 1.0 x\nq9 Q0 d1 1 1.0 x\n", r"names 1 query id\(s\).*'q9' \(line 3\)"),
    ("q1 Q0 d1 1 2.0 x\nq1 Q0 nope 2 1.0 x\n", r"names 1 document id\(s\).*'nope' \(line 2\)"),
    ("q1 Q0 d1 1 2.0\n", r"run.trec:1: a TREC run line has 6 fields"),
    ("q1 Q0 d1 1 high x\n", r"run.trec:1: the score 'high' is not a number"),
    ("q1 Q0 d1 1 2 x\nq1 Q0 d1 2 1 x\n", r"run.trec:2: .*a second time"),
], ids=["unknown-query", "unknown-document", "five-fields", "score-not-a-number", "document-twice"])
def test_run_naming_unknown_ids_or_malformed(beir, tmp_path, run, message):
    path = tmp_path / "run.trec"
    path.write_text(run)
    with pytest.raises(DataError, match=message):
        read_run(path, load_beir(beir))


def test_empty_candidates_are_refused(beir, tmp_path):
    data = load_beir(beir)
    path = tmp_path / "run.trec"
    path.write_text("q4 Q0 d1 1 1.0 x\n")  # only the query without qrels
    with pytest.raises(DataError, match="no candidates to rerank: 3 queries have qrels, and the run file has none"):
        first_stage_candidates(data, 10, read_run(path, data))
    root = write_beir(tmp_path / "other", queries=[{"_id": "q1", "text": "zebra giraffe"}], qrels=[("q1", "d1", 1)])
    with pytest.raises(DataError, match="BM25 found no document sharing a term"):
        first_stage_candidates(load_beir(root), 10)


def test_missing_metric_library_gives_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytrec_eval", None)
    with pytest.raises(MissingDependency, match=r'pip install "pytrec-eval-terrier>=0.5.6"'):
        mean_metrics({"q": {"d": 1}}, {"q": ["d"]}, [10])
    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(MissingDependency, match=r'pip install "bm25s>=0.2" "PyStemmer>=2.2"'):
        bm25_candidates({"q": "x"}, {"d": "x"}, 1)


def test_bad_options(beir, capsys):
    assert "--top-k must be at least 1" in refusal(capsys, ["eval", "--size", "17m", "--data", str(beir),
                                                            "--top-k", "0"])
    assert "name the reranker" in refusal(capsys, ["eval", "--data", str(beir)])
    with pytest.raises(SystemExit):
        main(["eval", "--size", "17m", "--data", str(beir), "--recall-at", "10,x"])


# --- end to end: the CLI on a tiny random-weights artifact --------------------------------------------------

def test_eval_cli_on_a_tiny_artifact(tiny_artifact, tiny_checkpoint, beir, tmp_path, capsys):
    from ettin_runtime import Artifact

    from ettin_export.evaluation.beir import document_text

    assert main(["eval", str(tiny_artifact), "--data", str(beir), "--json", "--recall-at", "1,3"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout holds the JSON object and nothing else
    assert set(report) >= {"data", "first_stage", "reranker", "crossencoder", "agreement", "evaluated_queries",
                           "pairs", "notes"}
    assert report["evaluated_queries"] == 3 and report["skipped_queries_no_qrels"] == 1
    assert report["data"]["documents"] == 6 and report["data"]["queries_with_qrels"] == 3
    for system in ("first_stage", "reranker", "crossencoder"):
        assert set(report[system]) >= {"ndcg@10", "mrr@10", "recall@1", "recall@3"}
    assert report["first_stage"]["kind"] == "bm25" and report["first_stage"]["settings"]["method"] == "lucene"
    assert report["crossencoder"]["checkpoint"] == str(tiny_checkpoint)

    # The reranker's metrics are those of the artifact's own scores on BM25's candidates.
    data = load_beir(beir)
    queries = {q: data.queries[q] for q in data.evaluated_query_ids}
    candidates = bm25_candidates(queries, {d: document_text(doc) for d, doc in data.corpus.items()}, 100)
    pairs = [(queries[q], data.document(d)) for q in queries for d, _ in candidates[q]]
    assert report["pairs"] == len(pairs) > 0
    with Artifact.open(tiny_artifact).load() as reranker:
        scores = iter(reranker.predict(pairs))
    rankings = {q: ranked([(d, float(next(scores))) for d, _ in candidates[q]]) for q in queries}
    expected = mean_metrics(data.qrels, rankings, [1, 3])
    assert {k: report["reranker"][k] for k in expected} == pytest.approx(expected)
    agreement = report["agreement"]
    assert agreement["pairs"] == len(pairs) and agreement["spearman"] > 0.99 and agreement["top1_agreement"] == 1.0

    # A run file as first stage, no CrossEncoder, and the table.
    assert main(["eval", str(tiny_artifact), "--data", str(beir), "--run", str(write_run(tmp_path / "run.trec")),
                 "--top-k", "2", "--no-reference"]) == 0
    table = capsys.readouterr().out
    assert "3 queries evaluated (1 without qrels skipped), 6 candidate pairs (top 2 per query)" in table
    assert "first stage: TREC run run.trec" in table and "recall@2" in table and "CrossEncoder" not in table


def test_eval_cli_on_a_checkpoint(tiny_checkpoint, beir, capsys):
    """A checkpoint: the packed PyTorch model is the reranker and CrossEncoder runs the same checkpoint."""
    assert main(["eval", str(tiny_checkpoint), "--data", str(beir), "--json", "--top-k", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reranker"]["model"]["kind"] == "checkpoint" and report["crossencoder"] is not None
    assert report["recall_at"] == [3] and "recall@3" in report["reranker"]
    assert report["agreement"]["spearman"] > 0.99


def test_an_artifact_from_the_hub_is_compared_only_with_reference(monkeypatch):
    from types import SimpleNamespace

    from ettin_export.commands.eval import _artifact_reference

    artifact = SimpleNamespace(source=SimpleNamespace(model="org/not-here", random_size=None))
    notes: list[str] = []
    args = SimpleNamespace(no_reference=False, reference=None)
    assert _artifact_reference(args, artifact, notes) is None
    assert "not a local folder" in notes[0] and "--reference" in notes[0]
    assert _artifact_reference(SimpleNamespace(no_reference=True, reference=None), artifact, []) is None


def test_a_missing_metric_library_is_refused_before_any_work(beir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytrec_eval", None)
    err = refusal(capsys, ["eval", "--size", "17m", "--random-weights", "--data", str(beir)])
    assert 'pip install "pytrec-eval-terrier>=0.5.6"' in err and "reading" not in err
