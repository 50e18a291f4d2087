"""The rerank HTTP API, as data and pure functions: request parsing, validation and the response body.
No web framework here (gateway.py serves it), so every rule is testable on its own.

`POST /v1/rerank` (Cohere v1 / Jina / vLLM form) and `POST /rerank` (text-embeddings-inference form)
take the same request:

    {"query": str,                                   required
     "documents": [str | {"text": str}, ...]         required (or "texts": [str, ...], TEI's name)
     "top_n": int >= 1,                              optional: the best n (default: all, sorted)
     "return_documents": bool,                       optional (TEI: "return_text"), default false
     "raw_scores": bool,                             optional, default false (see scores below)
     "truncate": bool,                               optional, default true; false is refused (see below)
     "truncation_direction": "right" | "left",       optional; must be the tokenizer's own
     "model": str}                                   optional, ignored (one model per server)

and answer
    /v1/rerank: {"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}]}
    /rerank:    [{"index", "score", "text"?}]
both sorted by descending score (ties: lower index first), cut to top_n.

Scores: `relevance_score` is sigmoid(logit), computed in float32 from the model's raw logit, in [0, 1]
(Cohere's "normalized" scores, TEI's default for a single-logit model); with `"raw_scores": true` it is
the raw logit itself, exactly what `Reranker.predict` returns.

Limits, as TEI has them: at most `max_documents` documents per request (TEI's --max-client-batch-size:
413), a body of at most `payload_limit` bytes (413), long documents truncated to the model's max_length
(never refused). Errors are `{"error": message, "error_type": kind}` with TEI's kinds: Validation (422;
413 for size limits), Empty (400), Overloaded (429), Unhealthy (503), Backend (424).
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass

import numpy as np

from ettin_runtime.checks import whole_number
from ettin_runtime.packing import not_text
from ettin_runtime.reranker import apply_activation

DEFAULT_MAX_DOCUMENTS = 1000
DEFAULT_PAYLOAD_LIMIT = 2_000_000  # bytes, TEI's --payload-limit default
DEFAULT_MAX_CONCURRENT_REQUESTS = 512  # TEI's --max-concurrent-requests default


class ApiError(Exception):
    """A request the API refuses, with its HTTP status and TEI's error_type."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


def validation(message: str, status: int = 422) -> ApiError:
    return ApiError(status, "Validation", message)


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool
    raw_scores: bool


def _shown(value, limit: int = 40) -> str:
    """A received value as JSON, cut to `limit` characters, for an error message."""
    try:
        return json.dumps(value)[:limit]
    except RecursionError:
        return "(a value nested too deeply to show)"


def _boolean(body: dict, *names: str) -> bool:
    for name in names:
        value = body.get(name)
        if value is not None:
            if not isinstance(value, bool):
                raise validation(f"`{name}` must be true or false, got {_shown(value)}")
            return value
    return False


def parse_request(raw: bytes, *, max_documents: int, truncation_side: str = "right") -> RerankRequest:
    """The request body -> RerankRequest, or ApiError saying what is wrong and what to send."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, "Validation", f"the request body is not JSON ({error}); send "
                       '{"query": "...", "documents": ["...", ...]}') from error
    except ValueError:  # JSON, but a number Python will not convert (more than sys.get_int_max_str_digits())
        raise ApiError(400, "Validation", f"the request body holds a number of more than {sys.get_int_max_str_digits()} "
                       'digits; send {"query": "...", "documents": ["...", ...]} with a small `top_n`') from None
    except RecursionError:  # the client's body, not the backend: nested deeper than Python's parser goes
        raise ApiError(400, "Validation", "the request body nests arrays or objects too deeply to parse (about "
                       f"{sys.getrecursionlimit()} levels at most); send "
                       '{"query": "...", "documents": ["...", ...]}') from None
    if not isinstance(body, dict):
        raise validation(f"the request body must be a JSON object, got {type(body).__name__}")
    query = body.get("query")
    if not isinstance(query, str):
        raise validation("`query` is required and must be a string" if query is None else
                         f"`query` must be a string, got {type(query).__name__}")
    if (problem := not_text(query)) is not None:
        raise validation(f"`query` {problem}")
    if "documents" in body and "texts" in body:
        raise validation("send `documents` or `texts` (the same list under TEI's name), not both")
    field = "texts" if "texts" in body else "documents"
    items = body.get(field)
    if items is None:
        raise validation("`documents` is required: a list of strings (or `texts`)")
    if not isinstance(items, list):
        raise validation(f"`{field}` must be a list of strings, got {type(items).__name__}")
    if not items:
        raise ApiError(400, "Empty", f"`{field}` cannot be empty")
    if len(items) > max_documents:
        raise validation(f"batch size {len(items)} > maximum allowed batch size {max_documents}: send at most "
                         f"{max_documents} documents per request", status=413)
    documents = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and field == "documents":
            item = item.get("text")
        if not isinstance(item, str):
            raise validation(f"`{field}[{index}]` must be a string (or {{\"text\": string}}), got "
                             f"{_shown(items[index], 60)}")
        if (problem := not_text(item)) is not None:
            raise validation(f"`{field}[{index}]` {problem}")
        documents.append(item)
    top_n = body.get("top_n")
    if top_n is not None and not whole_number(top_n):
        raise validation(f"`top_n` must be an integer of at least 1 (omit it for every document), got {_shown(top_n)}")
    truncate = body.get("truncate")
    if truncate is False:
        raise validation("`truncate: false` is not supported: documents are always truncated to the model's "
                         "max_length (omit `truncate`, or send true)")
    if truncate is not None and not isinstance(truncate, bool):
        raise validation(f"`truncate` must be true or false, got {_shown(truncate)}")
    direction = body.get("truncation_direction")
    if direction is not None and (not isinstance(direction, str) or direction.lower() != truncation_side):
        raise validation(f"`truncation_direction` {_shown(direction)}: this model truncates on the "
                         f"{truncation_side} (omit it, or send {json.dumps(truncation_side)})")
    rank_fields = body.get("rank_fields")
    if rank_fields not in (None, [], ["text"]):
        raise validation("`rank_fields` other than [\"text\"] is not supported: send documents as strings")
    return RerankRequest(query, documents, top_n, _boolean(body, "return_documents", "return_text"),
                         _boolean(body, "raw_scores"))


def ranked(request: RerankRequest, raw_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(document indices, their scores) by descending raw score, ties by index, cut to top_n. The order
    is decided on the raw logits, so sigmoid's float32 saturation cannot reorder the results."""
    raw_scores = np.asarray(raw_scores, dtype=np.float32).reshape(-1)
    if raw_scores.shape[0] != len(request.documents):
        raise ApiError(424, "Backend", f"the model returned {raw_scores.shape[0]} scores for "
                       f"{len(request.documents)} documents")
    if np.isnan(raw_scores).any():
        raise ApiError(424, "Backend", "score is NaN")
    order = np.argsort(-raw_scores, kind="stable")
    if request.top_n is not None:
        order = order[: request.top_n]
    scores = raw_scores if request.raw_scores else apply_activation(raw_scores, "sigmoid")
    return order, scores[order]


def cohere_response(request: RerankRequest, raw_scores: np.ndarray, model: str) -> dict:
    """/v1/rerank's body: {"id", "model", "results": [{"index", "relevance_score", "document"?}]}."""
    order, scores = ranked(request, raw_scores)
    results = []
    for index, score in zip(order.tolist(), scores.tolist()):
        entry = {"index": index, "relevance_score": score}
        if request.return_documents:
            entry["document"] = {"text": request.documents[index]}
        results.append(entry)
    return {"id": uuid.uuid4().hex, "model": model, "results": results}


def tei_response(request: RerankRequest, raw_scores: np.ndarray) -> list[dict]:
    """/rerank's body (text-embeddings-inference): [{"index", "score", "text"?}]."""
    order, scores = ranked(request, raw_scores)
    results = []
    for index, score in zip(order.tolist(), scores.tolist()):
        entry = {"index": index, "score": score}
        if request.return_documents:
            entry["text"] = request.documents[index]
        results.append(entry)
    return results
