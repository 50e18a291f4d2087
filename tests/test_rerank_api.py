"""The rerank API's rules without a server (ettin_export/serving/rerank_api.py): what is accepted, what is
refused with which status and error_type, and how scores become results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ettin_export.serving.rerank_api import ApiError, RerankRequest, cohere_response, parse_request, tei_response


def parse(body, max_documents: int = 10, **kw) -> RerankRequest:
    return parse_request(json.dumps(body).encode(), max_documents=max_documents, **kw)


def test_both_field_names_and_document_objects_are_accepted():
    assert parse({"query": "q", "documents": ["a", {"text": "b"}]}).documents == ["a", "b"]
    request = parse({"query": "q", "texts": ["a"], "return_text": True, "raw_scores": True, "truncate": True,
                     "truncation_direction": "Right", "model": "whatever", "unknown_field": 1})
    assert (request.documents, request.return_documents, request.raw_scores, request.top_n) == (["a"], True, True, None)
    assert parse({"query": "", "documents": [""], "top_n": 3}).top_n == 3  # empty strings are text too


@pytest.mark.parametrize("body, status, error_type, message", [
    ({"query": "q", "documents": ["a"] * 11}, 413, "Validation", "batch size 11 > maximum allowed batch size 10"),
    ({"query": "q", "texts": []}, 400, "Empty", "`texts` cannot be empty"),
    ({"query": "q", "documents": [{"title": "no text"}]}, 422, "Validation", "documents\\[0\\]"),
    ({"query": "q", "texts": [{"text": "objects are Cohere's, not TEI's"}]}, 422, "Validation", "texts\\[0\\]"),
    ({"query": "q", "documents": ["a"], "top_n": True}, 422, "Validation", "top_n"),
    ({"query": "q", "documents": ["a"], "top_n": -2}, 422, "Validation", "top_n"),
    ({"query": "q", "documents": ["a"], "return_documents": 1}, 422, "Validation", "return_documents"),
    ({"query": "q", "documents": ["a"], "truncation_direction": "left"}, 422, "Validation", "truncates on the right"),
    ({"query": "q", "documents": ["a"], "truncate": "no"}, 422, "Validation", "truncate"),
    ({"query": "q", "documents": ["a"], "rank_fields": ["title"]}, 422, "Validation", "rank_fields"),
    ({"query": ["q"], "documents": ["a"]}, 422, "Validation", "`query` must be a string"),
])
def test_refusals_carry_teis_status_and_error_type(body, status, error_type, message):
    with pytest.raises(ApiError, match=message) as failure:
        parse(body)
    assert (failure.value.status, failure.value.error_type) == (status, error_type)
    assert failure.value.body() == {"error": failure.value.message, "error_type": error_type}


def test_a_body_that_is_not_utf8_json_is_a_400():
    for raw in (b"\xff\xfe", b"", b'{"query": "q",'):
        with pytest.raises(ApiError) as failure:
            parse_request(raw, max_documents=10)
        assert failure.value.status == 400


def test_results_sort_by_raw_score_with_ties_by_index_and_default_to_sigmoid():
    rng = np.random.default_rng()
    raw = rng.normal(0, 4, size=40).astype(np.float32)
    raw[[3, 17, 30]] = raw[5]  # ties
    raw[[0, 1]] = (30.0, 29.0)  # sigmoid is 1.0 for both in float32: order must still follow the logits
    documents = [f"doc {i}" for i in range(len(raw))]
    order = np.argsort(-raw, kind="stable")

    body = cohere_response(RerankRequest("q", documents, None, False, False), raw, "m")
    assert [r["index"] for r in body["results"]] == order.tolist() and body["model"] == "m"
    scores = np.array([r["relevance_score"] for r in body["results"]])
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-raw[order].astype(np.float64))), rtol=0, atol=1e-6)
    assert body["results"][0]["index"] == 0 and body["results"][1]["index"] == 1
    assert np.all((scores >= 0) & (scores <= 1))

    top = cohere_response(RerankRequest("q", documents, 5, True, True), raw, "m")["results"]
    assert [r["index"] for r in top] == order[:5].tolist()
    assert [r["relevance_score"] for r in top] == raw[order[:5]].tolist()  # raw: the logits, exactly
    assert [r["document"] for r in top] == [{"text": documents[i]} for i in order[:5]]

    tei = tei_response(RerankRequest("q", documents, None, True, True), raw)
    assert [(r["index"], r["score"], r["text"]) for r in tei] == [(int(i), float(raw[i]), documents[i]) for i in order]


def test_a_wrong_or_nan_backend_answer_is_a_424():
    request = RerankRequest("q", ["a", "b"], None, False, False)
    for scores, message in ((np.array([1.0], np.float32), "1 scores for 2 documents"),
                            (np.array([1.0, np.nan], np.float32), "NaN")):
        with pytest.raises(ApiError, match=message) as failure:
            cohere_response(request, scores, "m")
        assert (failure.value.status, failure.value.error_type) == (424, "Backend")
