"""int8 that fails its rank gate: the linear layers the scores are most sensitive to go back to fp32, chosen
by measurement on the parity pairs, until the gate passes (accuracy-aware mixed precision).

Sensitivity of a linear layer: the gate's metrics (Spearman, top-1, top-10 overlap against the fp64 anchor,
and the score scale) of a graph in which only that layer is int8, each metric's shortfall taken as a share
of what its bound allows (`damage`: 1.0 uses up one bound's whole allowance). The scores of those graphs are
estimated to first order from one forward and backward pass of the PyTorch model (`estimated_sensitivity`)
rather than scored one graph per layer (`layer_sensitivity`, the fallback where the estimate cannot be made):
on the random 17m (28 layers, Zen 3) 31.6 s against 289.2 s, every damage within 1 % of the measured one;
the cost no longer grows with the number of layers (88 at 150m). The build keeps the most
damaging layers in fp32, one more per try, and judges each try with the real gate; it gives up after
`max_kept` layers (by default a quarter of the backbone's linear layers: beyond that int8 buys little speed)
and the last try's report is the verdict. Everything measured goes into the recipe in manifest.json.

Measured on the trained fixture (docs/trained-reranker.md): all layers int8, Spearman 0.934 and top-1 90 %
against fp32; the damage sits in the attention projections (Wqkv) of layers 0 and 1, whose constructed
lexical-match logits are large multiples of small activations that per-token 8-bit scales round coarsely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ettin_runtime.machine import ort_cpu_session

from ettin_export.parity import ParityMetrics
from ettin_export.targets import ScoreBounds


def damage(metrics: ParityMetrics, bounds: ScoreBounds, scale: float) -> float:
    """How much of the rank gates' allowance `metrics` use, summed over the bounds (0 for identical rankings)."""
    shares = [(1.0 - metrics.spearman) / max(1e-9, 1.0 - bounds.min_spearman),
              (1.0 - metrics.top1_agreement) / max(1e-9, 1.0 - bounds.min_top1_agreement),
              (1.0 - metrics.top10_overlap) / max(1e-9, 1.0 - bounds.min_top10_overlap)]
    if bounds.max_scale_error:
        shares.append(abs(scale - 1.0) / bounds.max_scale_error)
    return float(sum(shares))


def graph_scorer(encoder, pairs: Sequence[tuple[str, str]], batch_pairs: int = 32) -> Callable[[Path], np.ndarray]:
    """scores(graph) of `pairs` with ONNX Runtime's CPU provider (each batch one packed execution)."""
    import onnxruntime

    from ettin_export.graph.validate import INPUT_NAMES, OUTPUT_NAMES
    from ettin_runtime.packing import pack

    ids = encoder.encode(list(pairs))

    def scores(graph) -> np.ndarray:  # a path, or a ModelProto under 2 GiB (read from memory: no file written)
        session = ort_cpu_session(onnxruntime, graph.SerializeToString() if hasattr(graph, "SerializeToString")
                                  else graph)
        out = []
        for start in range(0, len(ids), batch_pairs):
            packed = pack(ids[start:start + batch_pairs])
            (got,) = session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, (packed.input_ids, packed.cu_seqlens))))
            out.append(got.reshape(-1))
        return np.concatenate(out).astype(np.float64)

    return scores


def single_layer_int8(fp32, int8, layer: str):
    """`fp32` (an ONNX ModelProto) with only `layer` in int8: that layer's node replaced by the nodes that
    compute its output in `int8`, the same graph quantized whole by the same recipe (the layer's activation
    quantizer, MatMulInteger, the scales), with their initializers. The same graph as quantizing `fp32`
    with every other linear layer kept in fp32, made in memory instead of by one quantizer run per layer.
    None where the quantized layer is no subgraph fed by the layer's own inputs (then quantize it alone)."""
    import onnx

    graph = fp32.graph
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.name == layer)
    weights = {t.name: t for t in graph.initializer}
    activations = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    int8_nodes = list(int8.graph.node)
    producer = {o: i for i, n in enumerate(int8_nodes) for o in n.output}
    int8_weights = {t.name: t for t in int8.graph.initializer}
    chosen, stack, needed = set(), [producer.get(o) for o in node.output], {}
    while stack:
        current = stack.pop()
        if current is None:
            return None
        if current in chosen:
            continue
        chosen.add(current)
        for name in int8_nodes[current].input:
            if not name:
                continue
            if name in activations:  # a tensor of the fp32 graph: only the layer's own input may feed it
                if name not in node.input:
                    return None
            elif name in weights and name not in needed:
                if name not in int8_weights or int8_weights[name].SerializeToString() != weights[name].SerializeToString():
                    return None
            elif name in int8_weights:
                needed[name] = int8_weights[name]
            else:
                stack.append(producer.get(name))
    made = [int8_nodes[i] for i in sorted(chosen)]  # in the int8 graph's (topological) order
    if {o for n in made for o in n.output} & activations != set(node.output):
        return None
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    nodes = list(probe.graph.node)
    nodes[index:index + 1] = made
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    kept = [t for t in probe.graph.initializer if t.name in used]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept + list(needed.values()))
    domains = {o.domain for o in probe.opset_import}
    probe.opset_import.extend(o for o in int8.opset_import if o.domain not in domains)
    return probe


def layer_sensitivity(fp32_graph: Path, body: Sequence[str], workdir: Path, score: Callable[[Path], np.ndarray],
                      anchor: np.ndarray, spans: Sequence[slice], bounds: ScoreBounds,
                      progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Per backbone linear layer of `body` (graph order): the gate's metrics with only that layer in int8,
    and its damage. The graph is quantized once, whole, and each probe made from it in memory
    (`single_layer_int8`); a graph with external weights (over 2 GiB) is quantized once per layer instead."""
    import onnx

    from ettin_export.graph.quantize import quantize_int8

    probe = workdir / "sensitivity.onnx"
    whole = workdir / "sensitivity-int8.onnx"
    external = Path(str(fp32_graph) + ".data").is_file()
    if not external:
        quantize_int8(fp32_graph, whole)
        fp32, int8 = onnx.load(str(fp32_graph)), onnx.load(str(whole))
    rows = []
    for index, name in enumerate(body):
        made = None if external else single_layer_int8(fp32, int8, name)
        if made is None:
            quantize_int8(fp32_graph, probe, keep_fp32=[other for other in body if other != name])
        rows.append(_sensitivity_row(name, score(probe if made is None else made), anchor, spans, bounds))
        if progress is not None:
            progress(index + 1, len(body))
    for leftover in [*workdir.glob("sensitivity.onnx*"), *workdir.glob("sensitivity-int8.onnx*")]:
        leftover.unlink()
    return rows


ESTIMATE_BATCH_TOKENS = 1024  # the estimate keeps a batch's autograd graph: a small budget bounds its memory


def int8_weight(int8, weight: str, shape: Sequence[int]):
    """(int8 values [N, K], float32 scale per output channel [N]) of the int8 graph's weight for the fp32
    graph's `weight` initializer, `shape` being the PyTorch layer's [N, K] (the quantizer's
    `<weight>_Transposed_quantized` and `_scale`, or without `_Transposed`: [K, N] and [N]); None where the
    graph holds no such pair, its zero point is not 0, or the shapes differ."""
    from onnx import numpy_helper

    tensors = {t.name: t for t in int8.graph.initializer}
    stem = next((stem for stem in (weight + "_Transposed", weight)
                 if stem + "_quantized" in tensors and stem + "_scale" in tensors), None)
    if stem is None:
        return None
    values = numpy_helper.to_array(tensors[stem + "_quantized"])
    scale = numpy_helper.to_array(tensors[stem + "_scale"]).astype(np.float32).reshape(-1)
    zero = tensors.get(stem + "_zero_point")
    if values.dtype != np.int8 or (zero is not None and np.any(numpy_helper.to_array(zero))):
        return None
    if values.ndim != 2 or tuple(values.T.shape) != tuple(shape) or scale.shape != (shape[0],):
        return None
    return np.ascontiguousarray(values.T), scale


def estimated_score_changes(model, encoder, fp32_graph: Path, int8_graph: Path, body: Sequence[str],
                            pairs: Sequence[tuple[str, str]],
                            progress: Callable[[int, int], None] | None = None) -> np.ndarray | None:
    """[layer of `body`, pair]: how far each pair's score moves when only that layer is int8, estimated to
    first order from one forward and one backward pass of the packed PyTorch fp32 `model` over `pairs`,
    instead of one graph run per layer (28 at 17m, 88 at 150m, each as costly as a whole forward pass).

    A pair's score moves by about sum over its tokens t of ds/dy_t . (y'_t - y_t), where y = x W^T is the
    layer's fp32 output and y' its int8 output from the same input: x rounded per token as the graph does
    (scale max|x_t| / 127, zero point 128) times the int8 graph's own dequantized weights. None where a
    layer's int8 weights cannot be read from `int8_graph` (then measure with `layer_sensitivity`)."""
    import onnx
    import torch

    from ettin_export.model.attention import attention_backend
    from ettin_runtime.packing import packed_batches

    fp32, int8 = onnx.load(str(fp32_graph), load_external_data=False), onnx.load(str(int8_graph))
    weight_of = {node.name: node.input[1] for node in fp32.graph.node if node.name in set(body)}
    modules = dict(model.named_modules())
    layers = []
    for name in body:
        module = modules.get(weight_of.get(name, "").removeprefix("model.").removesuffix(".weight"))
        if not isinstance(module, torch.nn.Linear) or module.bias is not None:
            return None
        weight = int8_weight(int8, weight_of[name], tuple(module.weight.shape))
        if weight is None:
            return None
        layers.append((name, module, tuple(torch.from_numpy(part) for part in weight)))  # int8 kept: 1 byte a weight
    del fp32, int8
    captured = {}
    hooks = [module.register_forward_hook(lambda module, inputs, output, name=name: captured.update(
        {name: (inputs[0].detach(), output)})) for name, module, _ in layers]
    change = np.zeros((len(layers), len(pairs)))
    batches = packed_batches(encoder.encode(list(pairs)), ESTIMATE_BATCH_TOKENS, 32)
    try:
        with attention_backend("reference"), torch.inference_mode(False), torch.enable_grad():
            for done, batch in enumerate(batches, start=1):
                captured.clear()
                cu_seqlens = torch.from_numpy(batch.cu_seqlens)
                scores = model(torch.from_numpy(batch.input_ids).long(), cu_seqlens, batch.max_seqlen)
                grads = torch.autograd.grad(scores.sum(), [captured[name][1] for name, _, _ in layers])
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
                pair_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
                for index, ((name, _, (values, weight_scale)), grad) in enumerate(zip(layers, grads)):
                    x, y = captured[name][0].float(), captured[name][1].detach().float()
                    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
                    int8_output = (torch.round(x / scale) * scale) @ values.float().T * weight_scale
                    moved = ((int8_output - y) * grad.float()).double()
                    per_pair = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, pair_of_token, moved.sum(-1))
                    change[index, batch.order] = per_pair.numpy()
                if progress is not None:
                    progress(done, len(batches))
    finally:
        for hook in hooks:
            hook.remove()
    return change


def _sensitivity_row(layer: str, candidate: np.ndarray, anchor: np.ndarray, spans: Sequence[slice],
                     bounds: ScoreBounds) -> dict:
    from ettin_export.parity.rule import score_scale

    metrics = ParityMetrics.compute(anchor, candidate, spans, bounds.tie_bits)
    scale = score_scale(candidate, anchor)
    return {"layer": layer, "damage": round(damage(metrics, bounds, scale), 4), "spearman": metrics.spearman,
            "top1_agreement": metrics.top1_agreement, "top10_overlap": metrics.top10_overlap,
            "score_scale": round(scale, 5)}


def estimated_sensitivity(model, encoder, fp32_graph: Path, int8_graph: Path, body: Sequence[str],
                          pairs: Sequence[tuple[str, str]], anchor: np.ndarray, spans: Sequence[slice],
                          bounds: ScoreBounds, progress: Callable[[int, int], None] | None = None) -> list[dict] | None:
    """`layer_sensitivity`'s rows from the gate's metrics of anchor + `estimated_score_changes` (None where
    those cannot be estimated)."""
    change = estimated_score_changes(model, encoder, fp32_graph, int8_graph, body, pairs, progress)
    if change is None:
        return None
    anchor = np.asarray(anchor, dtype=np.float64)
    return [_sensitivity_row(name, anchor + moved, anchor, spans, bounds) for name, moved in zip(body, change)]


ESTIMATED = "first-order estimate: one forward and backward pass of the packed PyTorch fp32 model"
MEASURED = "measured: one graph per layer, only that layer in int8, scored by ONNX Runtime"


def sensitivity(model, encoder, fp32_graph: Path, int8_graph: Path, body: Sequence[str], workdir: Path,
                pairs: Sequence[tuple[str, str]], anchor: np.ndarray, spans: Sequence[slice], bounds: ScoreBounds,
                progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], str]:
    """(each layer's metrics and damage, how they were found): estimated with `model` (the packed fp32 model
    `fp32_graph` was exported from) and `int8_graph` (`fp32_graph` with every backbone layer int8: the build's
    failed first try) where that graph's weights can be read (`estimated_sensitivity`), else measured layer
    by layer (`layer_sensitivity`, with its probe files in `workdir`)."""
    rows = estimated_sensitivity(model, encoder, fp32_graph, int8_graph, body, pairs, anchor, spans, bounds,
                                 progress=progress)
    if rows is not None:
        return rows, ESTIMATED
    return layer_sensitivity(fp32_graph, body, workdir, graph_scorer(encoder, pairs), anchor, spans, bounds,
                             progress), MEASURED


PROBE_PAIRS = 400  # the sensitivity probes score whole queries up to about this many pairs


def probe_spans(spans: Sequence[slice], budget: int = PROBE_PAIRS) -> list[slice]:
    """The queries (spans of the parity pairs) the sensitivity probes score: every one up to `budget` pairs,
    else an even spread across the set (at least 4 queries)."""
    if sum(span.stop - span.start for span in spans) <= budget:
        return list(spans)
    mean = np.mean([span.stop - span.start for span in spans])
    count = min(len(spans), max(4, int(budget // mean)))
    return [spans[i] for i in np.linspace(0, len(spans) - 1, count).round().astype(int).tolist()]


def probe_set(pairs: Sequence[tuple[str, str]], anchor: np.ndarray, spans: Sequence[slice], budget: int = PROBE_PAIRS):
    """(pairs, anchor, spans) of the queries `probe_spans` picks, the spans renumbered into the subset."""
    chosen = probe_spans(spans, budget)
    lengths = [span.stop - span.start for span in chosen]
    starts = np.cumsum([0] + lengths[:-1]).tolist()
    return ([pair for span in chosen for pair in pairs[span]],
            np.concatenate([np.asarray(anchor)[span] for span in chosen]),
            [slice(start, start + length) for start, length in zip(starts, lengths)])


def default_max_kept(num_linear_layers: int) -> int:
    return max(1, num_linear_layers // 4)


def fallback_order(sensitivity: Sequence[dict]) -> list[str]:
    """The layers to keep in fp32, most damaging first (layers that did no measurable damage are never kept)."""
    ranked = sorted((row for row in sensitivity if row["damage"] > 1e-3), key=lambda row: -row["damage"])
    return [row["layer"] for row in ranked]
