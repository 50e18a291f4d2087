"""`ettin-export bench`: the length profiles hit their stated token statistics, the JSON report has its
schema, and the CI speed gate: on a tiny config the ONNX artifact is not slower than CrossEncoder in
the same run (median of 5 interleaved runs)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from ettin_export.synthetic import lengths
from ettin_export.synthetic.checkpoints import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(0)


@pytest.mark.parametrize("name", list(lengths.PROFILES))
def test_profile_distribution_matches_its_documented_statistics(name):
    profile = lengths.PROFILES[name]
    query, document = profile.token_lengths(20_000, seed=1)
    assert query.min() >= profile.query.low and query.max() <= profile.query.high
    assert document.min() >= profile.document.low and document.max() <= profile.document.high
    assert abs(query.mean() - profile.query_mean) < 0.03 * profile.query_mean
    assert abs(document.mean() - profile.document_mean) < 0.03 * profile.document_mean
    truncated = float(np.mean(query + document + 3 > profile.max_length))
    assert abs(truncated - profile.truncated_share) < 0.01


@pytest.mark.parametrize("name", list(lengths.PROFILES))
def test_generated_text_has_exactly_the_sampled_token_counts(name, tokenizer):
    profile = lengths.PROFILES[name]
    pairs = lengths.make_pairs(profile, tokenizer, 150, seed=3)
    query, document = profile.token_lengths(150, seed=3)
    counted = [(len(tokenizer.encode(q, add_special_tokens=False).ids),
                len(tokenizer.encode(d, add_special_tokens=False).ids)) for q, d in pairs]
    assert counted == list(zip(query.tolist(), document.tolist()))
    stats = lengths.length_statistics(pairs, tokenizer, profile.max_length)
    assert stats["template_tokens"] == 3
    assert stats["pair_tokens"]["max"] <= profile.max_length
    assert stats["query_tokens"]["mean"] == pytest.approx(query.mean())


def test_nq_like_profile_is_the_published_benchmark_shape():
    profile = lengths.get_profile("nq-like")
    assert profile.max_length == 512
    assert 11.5 <= profile.query_mean <= 12.5 and 100 <= profile.document_mean <= 110


def test_pairs_file_and_refusals(tmp_path, tokenizer):
    good = tmp_path / "pairs.jsonl"
    good.write_text('{"query": "a", "document": "b c"}\n\n{"query": "d", "document": "e"}\n')
    pairs, description = lengths.load_pairs(str(good), tokenizer, 0)
    assert pairs == [("a", "b c"), ("d", "e")] and "file" in description
    assert lengths.load_pairs(str(good), tokenizer, 1)[0] == [("a", "b c")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a"}\n')
    with pytest.raises(lengths.LengthsError, match=r"bad.jsonl:1"):
        lengths.load_pairs(str(bad), tokenizer, 0)
    with pytest.raises(lengths.LengthsError, match="nq-like, short, long"):
        lengths.load_pairs("nq-ish", tokenizer, 10)


def test_bench_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, ettin_export.commands.bench; print(any(m in sys.modules for m in ('torch', 'onnx', 'onnxruntime')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_forward_flops_count_window_limited_attention():
    """2 FLOPs per multiply-add, counted by hand for one global and one local layer (window 2: a token
    sees at most 5 keys), at lengths inside and beyond the window; an Ettin size's per-token figure
    is the same count."""
    from ettin_export import sizes

    h, i = 8, 12
    dense = 2 * (3 * h * h + h * h + 2 * h * i + i * h)  # Wqkv, Wo, GeGLU Wi (2 x i), Wo
    for length in (3, 5, 40):
        attention = 2 * 2 * h * length + 2 * 2 * h * min(length, 5)  # QK^T and PV, global + local
        expected = length * (2 * dense) + length * attention
        assert sizes.forward_flops(h, i, (-1, 2), [length]) == expected
    assert sizes.forward_flops(h, i, (-1, 2), [3, 40]) == sizes.forward_flops(h, i, (-1, 2), [3]) + \
        sizes.forward_flops(h, i, (-1, 2), [40])
    spec = sizes.get_size("17m")
    assert spec.flops_per_token(300) * 300 == pytest.approx(
        sizes.forward_flops(spec.hidden, spec.intermediate, spec.windows(), [300]))
    assert spec.windows() == tuple(-1 if layer in spec.global_layers() else 64 for layer in range(spec.layers))


@pytest.mark.parametrize("order", ["as written", "reversed", "shuffled"])
def test_gpu_peak_lookup_takes_the_most_specific_entry_for_each_card(monkeypatch, order):
    """Every entry of the table is found from a device name that contains it, even where a shorter entry
    matches the same name (the H100 PCIe is not given the H100 SXM figures, an L40S not the L4's), in
    whatever order the table lists them; a card the table lacks gets None; --peak-tflops always wins."""
    from ettin_export.bench import measure as bench

    rng = random.Random()
    table = dict(bench.GPU_PEAK_TFLOPS)
    keys = list(table)
    if order == "reversed":
        keys.reverse()
    elif order == "shuffled":
        rng.shuffle(keys)
    monkeypatch.setattr(bench, "GPU_PEAK_TFLOPS", {k: table[k] for k in keys})
    overlapping = 0
    for key, peaks in table.items():
        name = f"NVIDIA {key} {rng.choice(['80GB HBM3', '94GB', '141GB HBM3e', ''])}".strip()
        overlapping += any(k != key and all(part in name for part in k.split()) for k in table)
        for precision, alias in (("bf16", "bfloat16"), ("fp32", "fp32")):
            assert bench.gpu_peak(name, alias, None) == peaks[precision], (name, precision, order)
    assert overlapping >= 4  # H100 PCIe/NVL/SXM beside H100, L40S beside L4: the case that needs care
    assert bench.gpu_peak("NVIDIA GeForce RTX 4090", "bf16", None) is None
    assert bench.gpu_peak(None, "bf16", None) is None
    override = rng.uniform(1, 2000)
    assert bench.gpu_peak("NVIDIA H100 80GB HBM3", "bf16", override) == override


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """A tiny random checkpoint (4 layers, hidden 64) built to an fp32 ONNX artifact."""
    from ettin_export.pipeline import BuildOptions, run_build
    from ettin_export.checkpoint import load_checkpoint
    from ettin_export.synthetic.checkpoints import write_random_checkpoint
    from ettin_export.targets import get_target

    root = tmp_path_factory.mktemp("bench")
    checkpoint = write_random_checkpoint(root / "ckpt", None, seed=7)
    options = BuildOptions(out=root / "artifact", target=get_target("cpu"), max_length=512, quiet=True,
                           check_crossencoder=False, parity_queries=2)
    assert run_build(lambda: load_checkpoint(str(checkpoint), max_length=512), options) == 0
    return root / "artifact", checkpoint


@pytest.mark.exclusive  # a speed gate: no other test beside it (tests/conftest.py)
def test_bench_json_schema_and_onnx_not_slower_than_crossencoder(tiny_artifact, tmp_path, capsys):
    """The CI speed gate: median of 5 interleaved runs, same pairs, same process."""
    from ettin_export.cli import main

    artifact, checkpoint = tiny_artifact
    out = tmp_path / "bench.json"
    args = ["bench", str(artifact), "--reference", str(checkpoint), "--pairs", "96", "--runs", "5",
            "--json", "--out", str(out), "--fail-below", "1.0", "--max-retries", "3", "--quiet"]
    status = main(args)
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert report["schema"] == "ettin-export.bench/1"
    assert set(report) >= {"command", "machine", "model", "lengths", "candidate", "baseline", "runs", "flops",
                           "results", "scores_max_abs_diff", "retried_runs", "loaded_runs_kept"}
    assert set(report["machine"]) >= {"cpu", "cores", "threads", "loaded", "other_processes_cores"}
    assert report["lengths"]["profile"] == "nq-like" and report["lengths"]["pairs"] == 96
    assert report["scores_max_abs_diff"] < 1e-4
    for mode in ("tokenization_inside", "tokenization_outside"):
        entry = report["results"][mode]
        for system in ("candidate", "baseline"):
            assert len(entry[system]["seconds"]) == 5
            median = entry[system]["median_s"]  # rounded to the microsecond
            assert entry[system]["pairs_per_s"] == pytest.approx(96 / median, rel=1e-3)
            assert entry[system]["tokens_per_s"] == pytest.approx(report["lengths"]["total_tokens"] / median, rel=1e-3)
        measured = entry["ratio"] if report["reliable"] else entry["unreliable_ratio"]
        assert measured == pytest.approx(entry["baseline"]["median_s"] / entry["candidate"]["median_s"], rel=1e-3)
    if not report["reliable"]:
        assert status == 4 and report["results"]["tokenization_inside"]["ratio"] is None
        pytest.skip(f"other processes loaded this machine during {report['loaded_runs_kept']} timed rounds: the speed "
                    "gate cannot be judged here (bench exit 4, unreliable)")
    ratio = report["results"]["tokenization_inside"]["ratio"]
    assert status == 0, f"ONNX Runtime is slower than CrossEncoder: {ratio:.2f}x"
    assert ratio >= 1.0


def test_bench_refuses_fewer_than_five_runs(tiny_artifact, capsys):
    from ettin_export.cli import main

    artifact, checkpoint = tiny_artifact
    assert main(["bench", str(artifact), "--reference", str(checkpoint), "--runs", "3"]) == 2
    assert "at least 5" in capsys.readouterr().err


def test_bench_warns_when_other_processes_load_the_machine(tiny_artifact, monkeypatch, capsys):
    from ettin_export.bench import measure
    from ettin_export.cli import main

    monkeypatch.setattr(measure, "LOADED_CORES", -1.0)  # every round counts as loaded
    artifact, checkpoint = tiny_artifact
    args = ["bench", str(artifact), "--reference", str(checkpoint), "--pairs", "16", "--runs", "5",
            "--timing", "inside", "--max-retries", "1", "--json", "--quiet"]
    assert main(args) == 4  # unreliable: the figures are shown, no ratio is claimed
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["retried_runs"] == 1 and report["loaded_runs_kept"] == 5 and report["machine"]["loaded"]
    assert report["reliable"] is False
    inside = report["results"]["tokenization_inside"]
    assert inside["ratio"] is None and inside["unreliable_ratio"] > 0
    assert "WARNING: 5 of the 5 timed rounds ran while other processes" in captured.err
    assert "UNRELIABLE: no ratio is reported" in captured.err
    assert main(args[:-2]) == 4  # the text report says "unreliable" where the ratio would stand
    text = capsys.readouterr().out
    assert "unreliable" in text and "x\n" not in text.split("medians of")[1]


def test_cpu_profile_script_accounts_for_the_graphs_operators(tiny_artifact):
    """scripts/profile_cpu.py: the operator table covers the linear layers and the attention body and
    its shares add up to the whole kernel time."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_cpu.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_artifact[0]), "--pairs", "24", "--runs", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^(\w+)\s+([\d.]+)%", result.stdout, flags=re.M))
    assert {"Gemm", "MatMul", "Softmax", "LayerNormalization"} <= set(rows), result.stdout
    assert abs(sum(float(v) for v in rows.values()) - 100.0) < 1.0


def test_padded_peers_score_as_crossencoder(tiny_checkpoint):
    """The padded-export peers the benchmarks compare against (OpenVINO, ONNX Runtime fp32 / int8) score the
    pairs CrossEncoder scores, in its order, at awkward lengths and one pair alone."""
    from ettin_export.bench.measure import CrossEncoderContender
    from ettin_export.bench.openvino_padded import OpenVinoPaddedContender
    from ettin_export.bench.ort_padded import OnnxRuntimeInt8PaddedContender
    from ettin_export.synthetic.text import random_pairs

    pairs = random_pairs(9, seed=int(np.random.default_rng().integers(1 << 30)))
    pairs += [("q", "w " * 62), ("a query", "w " * 128), ("", "d")]
    reference = CrossEncoderContender(str(tiny_checkpoint), 200, 4, "cpu", "float32").predict(pairs)
    openvino = OpenVinoPaddedContender(str(tiny_checkpoint), 200, 4, "fp32")
    np.testing.assert_allclose(openvino.predict(pairs), reference, atol=1e-4)
    np.testing.assert_allclose(openvino.predict(pairs[:1]), reference[:1], atol=1e-4)
    # The int8 peer checks its own fp32 export against CrossEncoder (its session before quantization).
    int8 = OnnxRuntimeInt8PaddedContender(str(tiny_checkpoint), 200, 4).predict(pairs)
    assert int8.shape == reference.shape and np.all(np.isfinite(int8))
    assert np.max(np.abs(int8 - reference)) < 0.25 * (np.ptp(reference) + 1e-6) + 0.05


def test_int8_activation_forms_script_times_three_quantizer_forms(tiny_artifact, tmp_path):
    """scripts/int8_activation_forms.py: the three graphs differ only in their activation quantizers (per
    token: no DynamicQuantizeLinear; static: each one replaced by a QuantizeLinear with constant scale and zero
    point), every form runs, and each gets its pairs/s."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    import onnx

    script = Path(__file__).resolve().parents[1] / "scripts" / "int8_activation_forms.py"
    result = subprocess.run([sys.executable, str(script), str(tiny_artifact[0]), "--pairs", "16", "--rounds", "1",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    speeds = dict(re.findall(r"^(per token|per batch|static)\s+([\d.]+) pairs/s", result.stdout, flags=re.M))
    assert set(speeds) == {"per token", "per batch", "static"} and all(float(v) > 0 for v in speeds.values())

    def ops(name):
        proto = onnx.load(str(tmp_path / f"{name}.onnx"), load_external_data=False)
        counts = {}
        for node in proto.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        constants = {t.name for t in proto.graph.initializer}
        fixed = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and set(n.input[1:3]) <= constants]
        return counts, len(fixed)

    batch, _ = ops("per_batch")
    token, _ = ops("per_token")
    static, static_fixed = ops("static")
    assert batch["DynamicQuantizeLinear"] > 0 and "DynamicQuantizeLinear" not in token
    assert "DynamicQuantizeLinear" not in static
    assert static.get("QuantizeLinear", 0) == batch["DynamicQuantizeLinear"] + batch.get("QuantizeLinear", 0)
    assert static["MatMulInteger"] == batch["MatMulInteger"] == token["MatMulInteger"]
    assert static_fixed == batch["DynamicQuantizeLinear"]  # each former one: constant scale and zero point
    # a folder that holds no artifact is refused before any work, with the runtime's reason
    refused = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "not an fp32 CPU artifact ONNX Runtime can run" in refused.stderr
