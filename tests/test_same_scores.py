"""Issue 9's promises, end to end through the command line: any healthy checkpoint builds and verifies
under the fp32 rule of docs/design.md ("Same scores") (deep, narrow, widely spread, made by the project or by transformers and
sentence-transformers themselves), a refused build says what was compared, and one max-length rule
holds for build, score, verify and bench."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest
import torch

from ettin_export.cli import main
from ettin_export.synthetic.text import random_sentence
from ettin_export.synthetic.checkpoints import write_random_checkpoint
from ettin_runtime import Artifact
from ettin_runtime.packing import resolve_max_length

from .foreign_checkpoint import write_foreign_crossencoder, write_foreign_sequence_classification

OWN_MAX_LENGTH = 300  # not 512: one rule must carry it from the checkpoint to every command


def _spread(path, seed: int) -> float:
    from sentence_transformers import CrossEncoder

    rng = random.Random(seed)
    pairs = [(random_sentence(rng, rng.randint(2, 12)), random_sentence(rng, rng.randint(5, 200))) for _ in range(40)]
    model = CrossEncoder(str(path), activation_fn=torch.nn.Identity(), device="cpu")
    return float(np.std(model.predict(pairs, show_progress_bar=False)))


@pytest.fixture(scope="module", params=["own-maker", "foreign-crossencoder"])
def wide_build(request, tmp_path_factory):
    """A deep (8-9 layers), narrow (hidden 128), widely spread (std >= 10) checkpoint, and the artifact
    `ettin-export build CKPT --target cpu` makes of it (max length: the checkpoint's own)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "own-maker":
        checkpoint = write_random_checkpoint(root / "ckpt", None, seed=41, hidden=128, layers=9, heads=4,
                                             intermediate=192, local_attention=128, score_std=14.0,
                                             max_seq_length=OWN_MAX_LENGTH)
    else:
        checkpoint = write_foreign_crossencoder(root / "ckpt", seed=42, layers=8, max_seq_length=OWN_MAX_LENGTH)
    out = root / "artifact"
    # One named runtime: what is under test is the fp32 rule, not the runtime choice (test_precisions times
    # the candidates); naming it skips timing both and judging each.
    status = main(["build", str(checkpoint), "--target", "cpu", "--out", str(out), "--parity-queries", "2",
                   "--runtime", "onnxruntime", "--quiet"])
    return checkpoint, out, status


def test_wide_spread_deep_checkpoints_build_and_verify(wide_build, capsys):
    checkpoint, out, status = wide_build
    assert status == 0
    assert _spread(checkpoint, seed=7) >= 10.0, "the checkpoint must spread its scores like a trained reranker"
    artifact = Artifact.open(out)
    assert artifact.parity.passed and artifact.max_length == OWN_MAX_LENGTH
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    own = report["reference_lowp_metrics"]["max_abs_diff"]
    assert report["passed"] and report["metrics"]["max_abs_diff"] <= 2 * own + 1e-5
    assert report["metrics"]["queries"] == 2  # verify judges on the set the build chose
    assert report["reference"].startswith("packed PyTorch fp64") and report["candidate_vs_reference_lowp"]


def _pairs_file(tmp_path, count: int = 12):
    """Pairs far longer than every candidate max length (300, 512): documents of 700-900 words."""
    rng = random.Random(5)
    pairs = [(random_sentence(rng, 8), random_sentence(rng, rng.randint(700, 900))) for _ in range(count)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in pairs))
    return path


def _score(args, capsys) -> np.ndarray:
    capsys.readouterr()
    assert main(["score", *args]) == 0
    return np.array([json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()])


def test_score_checkpoint_and_artifact_truncate_alike(wide_build, tmp_path, capsys):
    checkpoint, out, _ = wide_build
    pairs = _pairs_file(tmp_path)
    from_checkpoint = _score([str(checkpoint), "--pairs", str(pairs)], capsys)
    from_artifact = _score([str(out), "--pairs", str(pairs)], capsys)
    at_512 = _score([str(checkpoint), "--pairs", str(pairs), "--max-length", "512"], capsys)
    assert np.max(np.abs(from_checkpoint - from_artifact)) <= 3e-4  # two fp32 paths, same truncation
    assert np.max(np.abs(from_checkpoint - at_512)) > 1e-2  # a different truncation would show


def test_bench_truncates_as_the_checkpoint_and_the_artifact_do(wide_build):
    from ettin_export.commands import bench

    checkpoint, out, _ = wide_build
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for model in (str(checkpoint), str(out)):
        setup = bench.open_setup(parser.parse_args([model, "--baseline", "none"]))
        assert setup.max_length == OWN_MAX_LENGTH and setup.candidate.reranker.max_length == OWN_MAX_LENGTH


# --- a refused build says what was compared, the three figures, and what to try ---------------------------


def test_a_parity_failure_reports_the_three_figures(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from ettin_runtime.backends.onnxruntime import OnnxRuntimeReranker

    original = OnnxRuntimeReranker._score
    monkeypatch.setattr(OnnxRuntimeReranker, "_score", lambda self, batch: original(self, batch) + np.float32(1e-3))
    out = tmp_path / "art"
    assert main(["build", str(tiny_checkpoint), "--target", "cpu", "--out", str(out), "--parity-queries", "1",
                 "--runtime", "onnxruntime"]) == 1  # the broken runtime alone: no other runtime to fall back on
    err = capsys.readouterr().err
    for line in ("candidate vs anchor:", "own reference vs anchor:", "candidate vs own reference:"):
        assert line in err
    assert "packed PyTorch fp64" in err and "sentence-transformers CrossEncoder fp32" in err
    assert "max |Δscore| vs the fp64 anchor" in err and "2 x the own error of sentence-transformers" in err
    assert f"the rejected build is in {tmp_path / 'art.rejected'}" in err and "ettin-export verify" in err
    assert not out.exists()


def test_an_export_value_failure_reports_the_three_figures(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import onnx

    from ettin_export.graph import export as onnx_export

    original = onnx_export.export_onnx

    def export_then_break(model, path, precision="fp32"):
        exported = original(model, path, precision)
        proto = onnx.load(str(exported.path))
        bias = next(t for t in proto.graph.initializer if t.dims == [1] and t.data_type == onnx.TensorProto.FLOAT)
        value = onnx.numpy_helper.to_array(bias) + np.float32(1e-3)
        bias.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), bias.name))
        onnx.save(proto, str(exported.path))
        return exported

    monkeypatch.setattr(onnx_export, "export_onnx", export_then_break)
    out = tmp_path / "art"
    assert main(["build", str(tiny_checkpoint), "--target", "cpu", "--out", str(out), "--parity-queries", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "scores of the exported graph are" in err and "from the fp64 anchor" in err
    assert "x the own error of sentence-transformers CrossEncoder fp32" in err and "directly:" in err
    assert "Traceback" not in err and not out.exists()


def test_a_porting_mistake_in_the_packed_model_refuses_the_build(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """If the packed model itself had a porting mistake, its fp64 anchor would carry it too; the check
    against CrossEncoder (the fp32 rule both ways) must refuse before anything is exported."""
    from ettin_export.model import PackedReranker

    monkeypatch.setattr(PackedReranker, "pool", lambda self, hidden, cu: hidden[cu.long()[:-1] + 1])
    out = tmp_path / "art"
    assert main(["build", str(tiny_checkpoint), "--target", "cpu", "--out", str(out), "--parity-queries", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the packed model does not compute what sentence-transformers computes" in err
    assert "a porting difference, not rounding" in err and "nothing was exported" in err
    assert not out.exists() and not list(tmp_path.iterdir())


# --- one max-length rule: the checkpoint decides, as CrossEncoder does --------------------------------------


def _st_with_limit(path):
    return write_random_checkpoint(path, None, seed=1, max_seq_length=222)


def _st_without_limit(path):
    return write_random_checkpoint(path, None, seed=1)


def _hf_tokenizer_limit(path):
    return write_random_checkpoint(path, None, seed=1, layout="hf-sequence-classification", max_seq_length=140)


def _hf_no_tokenizer_limit(path):
    path = write_random_checkpoint(path, None, seed=1, layout="hf-sequence-classification")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("model_max_length")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _hf_stray_sentence_bert_config(path):
    """No modules.json: CrossEncoder builds its Transformer directly and never reads this file."""
    path = _hf_tokenizer_limit(path)
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 50}))
    return path


def _hf_saved_by_crossencoder(path):
    """A sequence-classification CrossEncoder saved by sentence-transformers at max_length 260."""
    from sentence_transformers import CrossEncoder

    source = _hf_tokenizer_limit(path.parent / "source")
    CrossEncoder(str(source), device="cpu", max_length=260).save_pretrained(str(path))
    return path


def _single_module_with_max_seq_length(path):
    """modules.json with one Transformer whose sentence_bert_config.json sets max_seq_length (older ST)."""
    path = _hf_saved_by_crossencoder(path)
    config = json.loads((path / "sentence_bert_config.json").read_text())
    config["max_seq_length"] = 180
    (path / "sentence_bert_config.json").write_text(json.dumps(config))
    return path


def _foreign_crossencoder(path):
    return write_foreign_crossencoder(path, seed=3, layers=2, max_seq_length=333)


def _foreign_sequence_classification(path):
    return write_foreign_sequence_classification(path, seed=3, layers=2, model_max_length=275)


@pytest.mark.parametrize("make", [
    _st_with_limit, _st_without_limit, _hf_tokenizer_limit, _hf_no_tokenizer_limit, _hf_stray_sentence_bert_config,
    _hf_saved_by_crossencoder, _single_module_with_max_seq_length, _foreign_crossencoder,
    _foreign_sequence_classification,
], ids=lambda f: f.__name__.strip("_"))
def test_max_length_is_what_crossencoder_reads(tmp_path, make):
    from sentence_transformers import CrossEncoder

    path = make(tmp_path / "ckpt")
    expected = CrossEncoder(str(path), device="cpu").max_seq_length  # the oracle: sentence-transformers itself
    assert resolve_max_length(path) == expected
    from ettin_export.checkpoint import load_checkpoint

    assert load_checkpoint(str(path)).max_length == expected


def test_max_length_override_is_checked_against_the_model(tiny_checkpoint, tmp_path, capsys):
    assert resolve_max_length(tiny_checkpoint, 64) == 64
    with pytest.raises(ValueError, match="beyond the model's 7999 positions"):
        resolve_max_length(tiny_checkpoint, 9000)
    for bad in (0, 1, -5):
        with pytest.raises(ValueError, match="at least 5 tokens"):
            resolve_max_length(tiny_checkpoint, bad)
    out = tmp_path / "never"
    assert main(["build", str(tiny_checkpoint), "--out", str(out), "--max-length", "9000", "--quiet"]) == 2
    assert "beyond the model's 7999 positions" in capsys.readouterr().err and not out.exists()
    assert main(["build", str(tiny_checkpoint), "--out", str(out), "--max-length", "0", "--quiet"]) == 2
    assert "at least 5 tokens" in capsys.readouterr().err and not out.exists()
