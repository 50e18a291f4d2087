"""The one JSON-lines pairs reader behind `score`, `verify --pairs` and `bench --lengths FILE`."""

import io
import json
import random
import sys

import pytest

from ettin_export.pairs import PairsFileError, read_pairs_jsonl
from ettin_export.parity import read_parity_file


def _write(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_pairs_in_order_with_blank_lines_and_unicode(tmp_path):
    rng = random.Random()
    pairs = [(f"q{rng.randrange(10**6)} é", "d" * rng.randint(0, 40)) for _ in range(rng.randint(3, 9))]
    lines = [json.dumps({"query": q, "document": d, "extra": 1}) for q, d in pairs]
    lines.insert(1, "   ")
    assert read_pairs_jsonl(_write(tmp_path, lines)) == pairs


@pytest.mark.parametrize(
    "bad, message",
    [("{not json", r"pairs.jsonl:2: not valid JSON"),
     ('{"query": "q"}', r"pairs.jsonl:2: expected .* got \{\"query\": \"q\"\}"),
     ('{"query": "q", "document": 3}', r"pairs.jsonl:2: expected"),
     ('["q", "d"]', r"pairs.jsonl:2: expected")],
)
def test_bad_lines_are_named_by_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [json.dumps({"query": "a", "document": "b"}), bad])
    with pytest.raises(PairsFileError, match=message):
        read_pairs_jsonl(path)


def test_empty_and_missing_files(tmp_path, monkeypatch):
    empty = _write(tmp_path, [""])
    with pytest.raises(PairsFileError, match="holds no pairs"):
        read_pairs_jsonl(empty)
    assert read_pairs_jsonl(empty, allow_empty=True) == []
    with pytest.raises(PairsFileError, match="cannot read pairs file .*nope.jsonl"):
        read_pairs_jsonl(tmp_path / "nope.jsonl")
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"query": "x", "document": "y"}\n'))
    assert read_pairs_jsonl("-") == [("x", "y")]


def test_parity_file_groups_documents_by_query_in_file_order(tmp_path):
    rows = [("b", "1"), ("a", "2"), ("b", "3"), ("c", "4"), ("a", "5")]
    path = _write(tmp_path, [json.dumps({"query": q, "document": d}) for q, d in rows])
    assert read_parity_file(path) == [("b", ["1", "3"]), ("a", ["2", "5"]), ("c", ["4"])]
