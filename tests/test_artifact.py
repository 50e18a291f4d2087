"""The artifact folder and its runtime: loading checks, inputs at the edges, threads, build and verify."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from ettin_export.pipeline import BuildError, BuildOptions, run_build
from ettin_export.checkpoint import load_checkpoint
from ettin_export.cli import main
from ettin_export.synthetic.checkpoints import write_random_checkpoint
from ettin_export.synthetic.text import random_pairs, random_sentence
from ettin_export.targets import get_target
from ettin_export.model.torch_reranker import TorchReranker
from ettin_runtime import Reranker
from ettin_runtime import Artifact, ArtifactError

from .references import assert_fp32_parity, references_for


def _copy(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "copy")


def test_manifest_records_what_every_stage_needs(tiny_artifact):
    artifact = Artifact.open(tiny_artifact)
    assert artifact.format_version == 1 and artifact.target == "cpu" and artifact.precision == "fp32"
    assert artifact.engine.format == "onnx" and artifact.engine.file == "model.onnx"
    assert artifact.engine.runtime == "onnxruntime" and artifact.engine.tensorrt is None
    assert artifact.engine.opset == 20 and artifact.engine.onnxruntime_version
    assert artifact.source.random_weights is True and len(artifact.source.weights_sha256) == 64
    assert artifact.max_length == 200 and artifact.score_activation == "identity"
    assert set(artifact.files) == {"model.onnx", "tokenizer.json", "tokenizer_config.json"}
    assert [i.name for i in artifact.inputs] == ["input_ids", "cu_seqlens"]
    assert artifact.limits.profile is None and artifact.limits.max_batch_pairs >= 1
    assert artifact.parity.passed and artifact.parity.figures["anchor_precision"] == "fp64"
    assert artifact.parity.max_abs_diff <= artifact.parity.max_abs_bound
    # the JSON form round-trips: what is written is what every reader gets
    assert Artifact.from_json(json.loads((tiny_artifact / "manifest.json").read_text()), tiny_artifact) == artifact
    report = json.loads((tiny_artifact / "parity.json").read_text())
    assert report["passed"] and report["metrics"]["queries"] == 2
    # the bound is docs/design.md's ("Same scores: the numbers"): 2 x CrossEncoder's own fp32 error against the fp64 anchor + 1e-5
    own = report["reference_lowp_metrics"]["max_abs_diff"]
    assert report["reference_lowp"].startswith("sentence-transformers CrossEncoder fp32") and own > 0
    assert report["bounds"]["max_abs_diff"] == pytest.approx(2 * own + 1e-5)
    assert artifact.parity.figures["candidate_vs_reference_lowp_max_abs_diff"] == pytest.approx(
        report["candidate_vs_reference_lowp"]["max_abs_diff"])


def test_runtime_scores_match_the_pytorch_model(tiny_artifact, tiny_checkpoint):
    runtime = Reranker.load(tiny_artifact)
    pairs = random_pairs(80, seed=8, document_words=(0, 300))
    scores = runtime.predict(pairs)
    assert scores.dtype == np.float32
    assert_fp32_parity(scores, references_for(tiny_checkpoint, pairs))
    # and the packed PyTorch model agrees with it far inside that bound (same function, same order)
    expected = TorchReranker.from_checkpoint(str(tiny_checkpoint)).predict(pairs)
    assert np.max(np.abs(scores - expected)) <= 1e-4


def test_edge_inputs(tiny_artifact, tiny_checkpoint):
    import torch
    from sentence_transformers import CrossEncoder

    runtime = Reranker.load(tiny_artifact)
    assert runtime.predict([]).shape == (0,)
    assert runtime.rank("query", []) == []
    huge = ("a question", random_sentence(__import__("random").Random(1), 5000))  # far beyond max_length
    edge = [("what is it", ""), ("", ""), huge, ("q", "d")]
    assert_fp32_parity(runtime.predict(edge), references_for(tiny_checkpoint, edge))  # empty and over-long
    cross_encoder = CrossEncoder(str(tiny_checkpoint), activation_fn=torch.nn.Identity(), max_length=200)
    assert len(cross_encoder.tokenizer(*huge, truncation=True, max_length=200)["input_ids"]) == 200


def test_batches_over_the_token_budget_are_split(tiny_artifact):
    runtime = Reranker.load(tiny_artifact)
    small = Reranker.load(tiny_artifact, max_batch_tokens=200, max_batch_pairs=3)
    pairs = random_pairs(40, seed=9, document_words=(50, 200))
    assert sum(len(ids) for ids in small.encoder.encode(pairs)) > 10 * 200
    assert np.max(np.abs(small.predict(pairs) - runtime.predict(pairs))) <= 1e-4


def test_runtime_is_safe_to_share_between_threads(tiny_artifact):
    runtime = Reranker.load(tiny_artifact, threads=1)
    work = [random_pairs(15, seed=s, document_words=(0, 120)) for s in range(8)]
    expected = [runtime.predict(pairs) for pairs in work]
    results = [None] * len(work)

    def score(index):
        for _ in range(3):
            results[index] = runtime.predict(work[index])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_corrupt_file_is_refused(tiny_artifact, tmp_path):
    artifact = _copy(tiny_artifact, tmp_path)
    with open(artifact / "model.onnx", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="model.onnx does not match its recorded sha256"):
        Reranker.load(artifact)


def test_missing_file_is_refused(tiny_artifact, tmp_path):
    artifact = _copy(tiny_artifact, tmp_path)
    (artifact / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):
        Reranker.load(artifact)


def test_newer_format_and_garbage_manifest_are_refused(tiny_artifact, tmp_path):
    artifact = _copy(tiny_artifact, tmp_path)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["format_version"] = 7
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 7, newer than this ettin-export understands"):
        Reranker.load(artifact)
    (artifact / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is corrupt"):
        Reranker.load(artifact)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Reranker.load(tmp_path)


def test_precision_the_runtime_cannot_run_is_refused(tiny_artifact, tmp_path):
    artifact = _copy(tiny_artifact, tmp_path)
    Artifact.open(artifact).replace(precision="bf16").write()
    with pytest.raises(ArtifactError, match="is a bf16 artifact .* runs fp32 and int8 ones"):
        Reranker.load(artifact)


def test_build_refuses_to_overwrite_and_keeps_the_old_artifact(tiny_artifact, tiny_checkpoint, tmp_path):
    out = _copy(tiny_artifact, tmp_path)
    before = (out / "manifest.json").read_text()
    options = BuildOptions(out=out, target=get_target("cpu"), max_length=200, parity_queries=1, quiet=True)
    loader = lambda: load_checkpoint(str(tiny_checkpoint), max_length=200)  # noqa: E731
    with pytest.raises(BuildError, match="already holds an artifact. Pass --force"):
        run_build(loader, options)
    assert (out / "manifest.json").read_text() == before
    stranger = tmp_path / "not-ours"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    options.out, options.force = stranger, True
    with pytest.raises(BuildError, match="not an ettin-export artifact"):
        run_build(loader, options)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_force_replaces_after_success(tiny_artifact, tiny_checkpoint, tmp_path):
    out = _copy(tiny_artifact, tmp_path)
    old_created = Artifact.open(out).created_at
    options = BuildOptions(out=out, target=get_target("cpu"), max_length=120, parity_queries=1, quiet=True,
                           force=True, check_crossencoder=False)
    assert run_build(lambda: load_checkpoint(str(tiny_checkpoint), max_length=120), options) == 0
    artifact = Artifact.open(out)
    assert artifact.max_length == 120 and artifact.created_at >= old_created
    assert not list(tmp_path.glob(".copy.*")), "no staging or backup folders left behind"


def test_verify_passes_and_refuses_a_different_reference(tiny_artifact, tmp_path, capsys):
    assert main(["verify", str(tiny_artifact), "--parity-queries", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    own = report["reference_lowp_metrics"]["max_abs_diff"]
    assert report["passed"] and report["metrics"]["max_abs_diff"] <= 2 * own + 1e-5
    assert report["metrics"]["pairs"] > 60 and report["bounds"]["max_abs_diff"] == pytest.approx(2 * own + 1e-5)
    assert report["reference"].startswith("packed PyTorch fp64")
    other = write_random_checkpoint(tmp_path / "other", None, seed=999, max_seq_length=200)
    assert main(["verify", str(tiny_artifact), "--reference", str(other)]) == 2
    assert "does not hold the weights this artifact was built from" in capsys.readouterr().err


def test_verify_on_a_user_file(tiny_artifact, tmp_path, capsys):
    pairs_file = tmp_path / "mine.jsonl"
    pairs = random_pairs(30, seed=3)
    pairs_file.write_text("".join(json.dumps({"query": q if i % 2 else "same query", "document": d}) + "\n"
                                  for i, (q, d) in enumerate(pairs)))
    assert main(["verify", str(tiny_artifact), "--pairs", str(pairs_file)]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_score_command_runs_an_artifact(tiny_artifact, tmp_path, capsys):
    pairs = random_pairs(5, seed=1)
    pairs_file = tmp_path / "p.jsonl"
    pairs_file.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in pairs))
    assert main(["score", str(tiny_artifact), "--pairs", str(pairs_file)]) == 0
    scores = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert np.allclose(scores, Reranker.load(tiny_artifact).predict(pairs), atol=1e-6)


def test_build_refuses_unknown_size_and_target(capsys, tmp_path):
    assert main(["build", "--size", "5m", "--random-weights", "--out", str(tmp_path / "x")]) == 2
    assert "Unknown Ettin size '5m'" in capsys.readouterr().err
    assert main(["build", "--size", "17m", "--random-weights", "--target", "tpu", "--out", str(tmp_path / "y")]) == 2
    assert "Unknown target 'tpu'. Known targets: cpu, h100" in capsys.readouterr().err


def test_runtime_path_imports_no_torch_or_transformers(tiny_artifact):
    import subprocess
    import sys

    script = (
        "import sys; from ettin_runtime import Reranker; r = Reranker.load(sys.argv[1]); "
        "s = r.predict([('a query', 'a document')]); assert s.shape == (1,); "
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers', 'ettin_export') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_artifact)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_runtime_only_install_does_not_require_torch():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    runtime = project["dependencies"] + project["optional-dependencies"]["ort"]
    assert not [d for d in runtime if d.split("[")[0].split(">")[0].split("=")[0].strip() in ("torch", "transformers")]
