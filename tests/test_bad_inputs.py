"""Bad input, table-driven: each row is what a user did, the exact message (or result) it must get,
and the check that nothing already on disk changed (issue 12)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ettin_export.cli import main
from ettin_export.synthetic.text import random_pairs
from ettin_runtime import Reranker


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots` (and the roots' own folder listings, hidden ones included) by sha256."""
    state = {}
    for root in roots:
        if not root.exists():
            state[str(root)] = "absent"
            continue
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        if root.is_dir():
            state[f"{root}/*"] = ",".join(sorted(p.name for p in root.parent.iterdir()))
    return state


def _pairs_file(path: Path, count: int = 6) -> Path:
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in random_pairs(count, seed=3)))
    return path


def _with_manifest(artifact: Path, where: Path, change) -> Path:
    copy = shutil.copytree(artifact, where)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _rejected(manifest):
    manifest["parity"]["passed"] = False


def _staging(manifest):
    manifest["parity"] = None


def _files_without_model(manifest):
    del manifest["files"]["model.onnx"]


# --- opening artifacts: only what passed its gate is served ------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    (_rejected, "FAILED its parity gate"),
    (_staging, "never passed a parity gate: its manifest has no parity result, so it is a staging folder"),
    (_files_without_model, "the manifest records no sha256 for model.onnx, which a runtime opens"),
])
def test_unverified_artifacts_are_refused_by_every_opener(tiny_artifact, tmp_path, capsys, change, message):
    artifact = _with_manifest(tiny_artifact, tmp_path / "artifact", change)
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    before = snapshot(artifact, pairs)
    with pytest.raises(Exception, match=message) as error:
        Reranker.load(artifact)
    from ettin_runtime.errors import EttinError

    assert isinstance(error.value, EttinError)
    for argv in (["score", str(artifact), "--pairs", str(pairs)],
                 ["deploy", "triton", str(artifact), "--repo", str(tmp_path / "repo"), "--allow-random-weights"],
                 ["verify", str(artifact)],
                 ["bench", str(artifact), "--runs", "5", "--quiet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "repo").exists()
    assert snapshot(artifact, pairs) == before


def test_a_rejected_build_can_be_inspected_on_request(tiny_artifact, tmp_path, capsys):
    artifact = _with_manifest(tiny_artifact, tmp_path / "art.rejected", _rejected)
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    assert main(["score", str(artifact), "--pairs", str(pairs), "--allow-unverified"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    assert len(Reranker.load(artifact, allow_unverified=True).predict([("q", "d")])) == 1


# --- limits, checked before any long work --------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-length", "100000"], "max_length 100000 is beyond the model's 7999 positions"),
    (["--max-length", "9000"], "max_length 9000 is beyond the model's 7999 positions"),
    (["--max-length", "0"], "max_length must be an integer of at least 2 tokens"),
    (["--max-batch-tokens", "10"], "--max-batch-tokens 10 is below the max length 200"),
    (["--max-batch-size", "0"], "--max-batch-size must be an integer of at least 1 (pairs per run); got 0"),
    (["--parity-queries", "0"], "--parity-queries must be an integer of at least 1; got 0"),
])
def test_build_limits_are_refused_in_seconds(tiny_checkpoint, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    start = time.perf_counter()
    assert main(["build", str(tiny_checkpoint), "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert time.perf_counter() - start < 20  # the checkpoint is read; nothing is built
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("options", "message"), [
    ({"max_length": 100000}, "max_length 100000 is outside what .* can take: 2 to 7999 tokens"),
    ({"max_length": 1}, "max_length 1 is outside"),
    ({"max_batch_tokens": 0}, "max_batch_tokens must be an integer of at least 1"),
    ({"max_batch_tokens": 12.5}, "max_batch_tokens must be an integer of at least 1"),
    ({"max_batch_pairs": 0}, "max_batch_pairs must be an integer of at least 1"),
])
def test_runtime_limits_are_refused_before_anything_is_allocated(tiny_artifact, options, message):
    from ettin_runtime import ArtifactError

    with pytest.raises(ArtifactError, match=message):
        Reranker.load(tiny_artifact, **options)


# --- output paths -------------------------------------------------------------------------------------------


def test_score_never_overwrites_its_input_nor_writes_into_a_folder(tiny_artifact, tmp_path, capsys):
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    before = snapshot(pairs)
    assert main(["score", str(tiny_artifact), "--pairs", str(pairs), "--out", str(pairs)]) == 2
    assert "is the file the pairs are read from; writing there would destroy it" in capsys.readouterr().err
    assert main(["score", str(tiny_artifact), "--pairs", str(pairs), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder; name the file to write into" in capsys.readouterr().err
    assert main(["score", str(tiny_artifact), "--pairs", str(pairs), "--out", str(tmp_path / "no" / "x.jsonl")]) == 2
    assert "does not exist; create it" in capsys.readouterr().err
    assert snapshot(pairs) == before and not list(tmp_path.glob(".*"))
    out = tmp_path / "scores.jsonl"
    out.write_text("old scores\n")
    assert main(["score", str(tiny_artifact), "--pairs", str(pairs), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 6 and not list(tmp_path.glob(".scores.jsonl.*"))


# --- checkpoint files -----------------------------------------------------------------------------------------


def _truncate_weights(path: Path) -> str:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return f"{weights} cannot be read (SafetensorError"


def _break_config(path: Path) -> str:
    (path / "config.json").write_text('{"model_type": "modernbert", "hidden_size": ')
    return f"{path / 'config.json'} is not valid JSON"


def _break_tokenizer(path: Path) -> str:
    (path / "tokenizer.json").write_text("{not a tokenizer")
    return f"{path / 'tokenizer.json'} cannot be read as a tokenizer"


@pytest.mark.parametrize("damage", [_truncate_weights, _break_config, _break_tokenizer],
                         ids=["truncated-safetensors", "broken-config-json", "broken-tokenizer-json"])
def test_damaged_checkpoint_files_are_named(tiny_checkpoint, tmp_path, capsys, damage):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    message = damage(checkpoint)
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    before = snapshot(tmp_path)
    for argv in (["score", str(checkpoint), "--pairs", str(pairs)],
                 ["build", str(checkpoint), "--out", str(tmp_path / "out"), "--quiet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert snapshot(tmp_path) == before


# --- the Python API -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda r: r.predict(None), TypeError, "predict() takes a list of (query, document) pairs, got NoneType"),
    (lambda r: r.predict("a query"), TypeError, "takes a list of (query, document) pairs, got str"),
    (lambda r: r.predict([("q", "d")], batch_size=0), ValueError, "batch_size must be a positive integer"),
    (lambda r: r.predict([("q", "d")], batch_size=-3), ValueError, "batch_size must be a positive integer"),
    (lambda r: r.rank("q", ["a", "b"], top_k=-1), ValueError, "top_k must be None (all documents) or a non-negative"),
    (lambda r: r.rank("q", None), TypeError, "documents must be a list of strings, got None"),
    (lambda r: r.predict([("q", None)]), ValueError, "Pair 0: the document is NoneType None"),
])
def test_bad_calls_get_clear_errors(tiny_artifact, call, error, message):
    import re

    with Reranker.load(tiny_artifact) as reranker:
        with pytest.raises(error, match=re.escape(message)):
            call(reranker)
        assert reranker.rank("q", ["a", "b"], top_k=0) == []  # zero is a valid (empty) top-k


# --- interruptions ---------------------------------------------------------------------------------------------


def _build_command(checkpoint: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ettin_export.cli", "build", str(checkpoint), "--out", str(out), "--force",
            "--parity-queries", "2"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_build_ends_in_one_line_and_leaves_the_old_artifact(tiny_artifact, tiny_checkpoint, tmp_path,
                                                                          signum):
    out = shutil.copytree(tiny_artifact, tmp_path / "art")
    before = snapshot(out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_build_command(tiny_checkpoint, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".art.building-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(1.0)  # inside the work, not at its first line
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130), err
    last = err.strip().splitlines()[-1]
    assert last == ("ettin-export build: terminated (SIGTERM); nothing half-written was kept." if signum == signal.SIGTERM
                    else "ettin-export build: interrupted; nothing half-written was kept."), err
    assert "Traceback" not in err
    assert snapshot(out) == before  # the old artifact, byte for byte, and no staging folder beside it


def test_the_next_build_removes_what_a_dead_build_left(tiny_artifact, tiny_checkpoint, tmp_path, capsys):
    out = shutil.copytree(tiny_artifact, tmp_path / "art")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = shutil.copytree(tiny_artifact, tmp_path / f".art.building-{dead.pid}")
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["parity"] = None  # what a staging folder holds before its gate
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="never passed a parity gate"):
        Reranker.load(stale)  # it can never be served by mistake meanwhile
    live = tmp_path / f".art.building-{os.getppid()}"  # a live process's: left alone
    live.mkdir()
    assert main(["build", str(tiny_checkpoint), "--out", str(out), "--force", "--parity-queries", "1",
                 "--skip-crossencoder-check"]) == 0
    assert f"removed .art.building-{dead.pid}, left by a build whose process is gone" in capsys.readouterr().err
    assert not stale.exists() and live.is_dir()
