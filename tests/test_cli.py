"""The command line: `score` end to end, and how it refuses bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ettin_export.checkpoint import random_checkpoint_dir
from ettin_export.cli import main
from ettin_export.synthetic.text import random_pairs
from ettin_export.model.torch_reranker import TorchReranker


def _write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in pairs))
    return path


def test_score_random_weights_size_writes_scores_in_input_order(tmp_path, capsys):
    pairs = random_pairs(25, seed=31, document_words=(0, 300))
    pairs_file = _write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert main(["score", "--size", "17m", "--random-weights", "--pairs", str(pairs_file), "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scores = np.array([json.loads(line)["score"] for line in lines], dtype=np.float32)
    expected = TorchReranker.from_checkpoint(str(random_checkpoint_dir("17m"))).predict(pairs)
    assert len(scores) == 25
    assert np.max(np.abs(scores - expected)) < 1e-4


def test_score_checkpoint_path_to_file_with_sigmoid(tmp_path, tiny_checkpoint):
    pairs = random_pairs(9, seed=32)
    pairs_file = _write_pairs(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "scores.jsonl"
    args = ["score", str(tiny_checkpoint), "--pairs", str(pairs_file), "--out", str(out), "--activation", "sigmoid"]
    assert main(args) == 0
    scores = np.array([json.loads(line)["score"] for line in out.read_text().splitlines()])
    raw = TorchReranker.from_checkpoint(str(tiny_checkpoint)).predict(pairs)
    assert np.allclose(scores, 1 / (1 + np.exp(-raw.astype(np.float64))), atol=1e-6)


def test_score_refuses_a_bad_line_with_its_number(tmp_path, tiny_checkpoint, capsys):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text('{"query": "a", "document": "b"}\n\n{"query": "a"}\n')
    assert main(["score", str(tiny_checkpoint), "--pairs", str(pairs_file)]) == 2
    err = capsys.readouterr().err
    assert f"{pairs_file}:3: expected" in err


def test_score_refuses_an_unknown_size(tmp_path, capsys):
    pairs_file = _write_pairs(tmp_path / "pairs.jsonl", [("a", "b")])
    assert main(["score", "--size", "7b", "--random-weights", "--pairs", str(pairs_file)]) == 2
    assert "Unknown Ettin size '7b'" in capsys.readouterr().err


def test_score_empty_file_gives_no_output(tmp_path, tiny_checkpoint, capsys):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("")
    assert main(["score", str(tiny_checkpoint), "--pairs", str(pairs_file)]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("missing", ["nowhere.jsonl"])
def test_score_missing_pairs_file(tmp_path, tiny_checkpoint, capsys, missing):
    assert main(["score", str(tiny_checkpoint), "--pairs", str(tmp_path / missing)]) == 2
    assert "cannot read pairs file" in capsys.readouterr().err
