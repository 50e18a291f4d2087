"""The exported graph: its contract, its numbers (fp32 against CrossEncoder, bf16 widened), its body."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from ettin_export.checkpoint import load_checkpoint
from ettin_export.graph.export import ExportError, export_onnx, varlen_attention_function
from ettin_export.graph.validate import bf16_as_fp32, bf16_islands, check_graph_contract, random_packed_inputs
from ettin_plugins import spec
from ettin_runtime import Reranker

from .pairsets import parity_pairs
from .references import assert_fp32_parity, references_for


@pytest.fixture(scope="module")
def fp32_graph(tiny_artifact):
    return onnx.load(str(tiny_artifact / "model.onnx"))


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory, ettin17m_reduced):
    checkpoint = load_checkpoint(str(ettin17m_reduced))
    path = tmp_path_factory.mktemp("bf16") / "model.onnx"
    export_onnx(checkpoint.build_model(), path, "bf16")
    return checkpoint, onnx.load(str(path))


def test_graph_contract(fp32_graph):
    graph = fp32_graph.graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [
        ("input_ids", TensorProto.INT32), ("cu_seqlens", TensorProto.INT32)]
    assert [i.type.tensor_type.shape.dim[0].dim_param for i in graph.input] == ["total_tokens", "num_pairs_plus_1"]
    (output,) = graph.output
    assert output.name == "scores" and output.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["num_pairs", 1]
    nodes = [n for n in graph.node if n.op_type == "VarlenAttention"]
    assert len(nodes) == 4 and all(n.domain == "ettin" for n in nodes)
    windows = [helper.get_attribute_value(next(a for a in n.attribute if a.name == "window")) for n in nodes]
    assert windows == [-1, 16, 16, -1]
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"ettin" and attrs["aot"] == 1
    functions = [(f.domain, f.name) for f in fp32_graph.functions]
    assert ("ettin", "VarlenAttention") in functions
    assert ("ettin", 1) in [(o.domain, o.version) for o in fp32_graph.opset_import]
    onnx.checker.check_model(fp32_graph, full_check=True)
    check_graph_contract(fp32_graph, 4)


def test_contract_check_catches_a_broken_graph(fp32_graph):
    broken = onnx.ModelProto()
    broken.CopyFrom(fp32_graph)
    node = next(n for n in broken.graph.node if n.op_type == "VarlenAttention")
    kept = [a for a in node.attribute if a.name != "plugin_namespace"]
    del node.attribute[:]
    node.attribute.extend(kept)
    with pytest.raises(ExportError, match="no plugin_namespace attribute; TensorRT >= 10.15 would inline"):
        check_graph_contract(broken, 4)
    namespace = onnx.helper.make_attribute("plugin_namespace", "other")
    node.attribute.append(namespace)
    with pytest.raises(ExportError, match="plugin_namespace is STRING b'other', the plugin is registered in namespace 'ettin'"):
        check_graph_contract(broken, 4)
    node.attribute.remove(namespace)
    node.attribute.append(onnx.helper.make_attribute("plugin_namespace", "ettin"))
    check_graph_contract(broken, 4)  # put back: the graph holds again
    broken.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
    with pytest.raises(ExportError, match="expected exactly input_ids:int32, cu_seqlens:int32"):
        check_graph_contract(broken, 4)


def test_onnxruntime_matches_crossencoder(tmp_path_factory, ettin17m_reduced):
    """fp32 ONNX Runtime against sentence-transformers on the parity grid (window-crossing and
    truncated pairs included), through the real build."""
    from ettin_export.pipeline import BuildOptions, run_build
    from ettin_export.targets import get_target

    out = tmp_path_factory.mktemp("e17m-art") / "art"
    options = BuildOptions(out=out, target=get_target("cpu"), max_length=320, parity_queries=2, quiet=True,
                           runtime="onnxruntime")  # the runtime this test is about (OpenVINO's build is timed elsewhere)
    assert run_build(lambda: load_checkpoint(str(ettin17m_reduced), max_length=320), options) == 0
    runtime = Reranker.load(out)
    assert runtime.artifact.engine.runtime == "onnxruntime"
    pairs = parity_pairs(runtime.encoder, seed=404, count=150, max_words=500)
    lengths = [len(ids) for ids in runtime.encoder.encode(pairs)]
    assert max(lengths) == 320 and sum(n > 129 for n in lengths) > 20
    refs = references_for(ettin17m_reduced, pairs, max_length=320)
    assert refs.own.std() >= 3.0
    assert_fp32_parity(runtime.predict(pairs), refs)


def test_bf16_graph_types_and_fp32_islands(bf16_export):
    checkpoint, proto = bf16_export
    layers = checkpoint.config.num_layers
    weights = {t.name: t for t in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    weight_types = [TensorProto.DataType.Name(weights[i].data_type) for n in matmuls for i in n.input[:2] if i in weights]
    # every matmul weight is bf16 but the score projection's ([1, H], kept fp32 so the score is fp32)
    assert weight_types.count("BFLOAT16") == 4 * layers + 1 and weight_types.count("FLOAT") == 1
    score_gemm = next(n for n in matmuls if any(weights.get(i) is not None and weights[i].data_type == TensorProto.FLOAT
                                                 for i in n.input))
    assert score_gemm.output[0] == proto.graph.output[0].name
    assert [list(weights[i].dims) for i in score_gemm.input if i in weights and len(weights[i].dims) == 2] == [[1, 256]]
    islands = bf16_islands(proto)
    assert set(islands["large_weights"]) == {"BFLOAT16"}
    # The fp32 islands, exactly: every LayerNorm (stats and affine), the rotary arithmetic on upcast
    # q and k (+ the fp32 angles), and the score projection. Softmax is fp32 inside the attention body.
    layer_norms = 1 + (2 * layers - 1) + 1 + 1  # embeddings, per layer (layer 0: MLP only), final, head
    assert islands["ops_fed_fp32"] == {
        "LayerNormalization": layer_norms, "Mul": 2 * layers, "Slice": 4 * layers, "Gemm": 1, "Unsqueeze": 1,
    }
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    body = next(f for f in proto.functions if f.name == spec.OP_NAME)
    softmax_input = next(n for n in body.node if n.op_type == "Softmax").input[0]
    casts_to_fp32 = {n.output[0] for n in body.node if n.op_type == "Cast"
                     and helper.get_attribute_value(n.attribute[0]) == TensorProto.FLOAT}
    assert {"qf", "kf", "vf"} <= casts_to_fp32 and softmax_input == "masked_scores"


def test_bf16_graph_arithmetic_matches_fp32_model_with_bf16_weights(bf16_export):
    """The same graph, bf16 types and weights widened to fp32, in ONNX Runtime on the validation grid:
    within the fp32 rule of the fp64 anchor of the model whose weights are rounded to bf16 (what build
    checks), and far outside it against the unrounded model, i.e. the check sees bf16 rounding."""
    from ettin_export.graph.export import ExportError
    from ettin_export.parity.references import fp32_references
    from ettin_export.graph.validate import check_values, validation_batches
    from ettin_runtime.packing import PairEncoder

    checkpoint, proto = bf16_export
    session = onnxruntime.InferenceSession(bf16_as_fp32(proto).SerializeToString(), providers=["CPUExecutionProvider"])
    encoder = PairEncoder.from_dir(checkpoint.path, checkpoint.max_length)
    batches = validation_batches(encoder, seed=5)
    pairs = [pair for batch in batches for pair in batch]
    rounded = fp32_references(checkpoint, pairs, encoder, bf16_weights=True)
    assert check_values(session, encoder, batches, rounded) <= 2 * np.max(np.abs(rounded.own - rounded.anchor)) + 1e-5
    with pytest.raises(ExportError, match="from the fp64 anchor .* beyond 2 x"):
        check_values(session, encoder, batches, fp32_references(checkpoint, pairs, encoder))


def _attention_only_model(window: int, heads: int, dim: int) -> onnx.ModelProto:
    tensor = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)  # noqa: E731
    node = helper.make_node("VarlenAttention", ["q", "k", "v", "cu_seqlens"], ["out"], domain="ettin", window=window)
    graph = helper.make_graph(
        [node], "attention",
        [tensor("q", ["T", heads, dim]), tensor("k", ["T", heads, dim]), tensor("v", ["T", heads, dim]),
         helper.make_tensor_value_info("cu_seqlens", TensorProto.INT32, ["B1"])],
        [tensor("out", ["T", heads, dim])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("ettin", 1)],
        functions=[varlen_attention_function(20)],
    )


@pytest.mark.parametrize("window", [-1, 0, 3, 64])
def test_function_body_matches_reference(window):
    from ettin_export.model.attention import reference_varlen_attention

    session = onnxruntime.InferenceSession(_attention_only_model(window, 2, 16).SerializeToString())
    lengths = [1, 63, 64, 65, 129, 2, 7]
    generator = torch.Generator().manual_seed(window + 10)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=generator) * 1.5 for _ in range(3))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    (got,) = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "cu_seqlens": cu.numpy()})
    assert np.max(np.abs(got - reference_varlen_attention(q, k, v, cu, window).numpy())) < 1e-5


def test_function_body_never_builds_token_by_token_tensors():
    """200,000 tokens in 20,000 pairs of 10: a [T, T] score tensor would need 160 GB and fail; the
    body's per-pair blocks need 20,000 x 10 x 10 scores and finish at once."""
    session = onnxruntime.InferenceSession(_attention_only_model(3, 1, 8).SerializeToString())
    pairs, length = 20_000, 10
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((pairs * length, 1, 8), dtype=np.float32) for _ in range(3))
    cu = (np.arange(pairs + 1) * length).astype(np.int32)
    (out,) = session.run(None, {"q": q, "k": k, "v": v, "cu_seqlens": cu})
    assert out.shape == q.shape and np.isfinite(out).all()


def test_external_data_for_large_models(tmp_path, monkeypatch, tiny_checkpoint):
    """Past the 2 GiB protobuf limit (simulated with a tiny threshold), weights go to model.onnx.data
    and the checker and ONNX Runtime read them from the path."""
    import ettin_export.graph.export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    exported = export_onnx(load_checkpoint(str(tiny_checkpoint)).build_model(), tmp_path / "model.onnx", "fp32")
    assert exported.external_data == tmp_path / "model.onnx.data"
    assert exported.external_data.stat().st_size > (tmp_path / "model.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    input_ids, cu_seqlens = random_packed_inputs(3, 20, 500, 0)
    assert session.run(None, {"input_ids": input_ids, "cu_seqlens": cu_seqlens})[0].shape == (3, 1)
