#!/usr/bin/env python3
"""Two int8 recipes OpenVINO could run instead of ONNX Runtime's, side by side with the shipped one.

    python scripts/int8_alternatives.py [--size 17m] [--pairs 256] [--rounds 7] [--out DIR]

Random weights at the exact Ettin config (speed does not depend on weight values), 256 NQ-like pairs (seed 11):

  weight-only  the fp32 graph with each backbone linear layer's weight int8 (symmetric, per output channel)
               behind a DequantizeLinear: OpenVINO's CPU plugin may run such layers with int8 dot products
               on activations it quantizes itself at run time, per token in groups of
               DYNAMIC_QUANTIZATION_GROUP_SIZE channels. Printed: how its FullyConnected layers compiled, and
               whether the group size changes a score (if none does, dynamic quantization never ran); timed at
               the plugin's default group size and at 128.
  static       ONNX Runtime's quantize_static (QDQ, weights int8 per channel in 7 bits, uint8 activations
               with one scale per tensor calibrated by min/max on 256 other NQ-like pairs, seed 99, the head
               in fp32) under OpenVINO, which compiles QDQ into int8 kernels.

beside CrossEncoder, the padded ONNX Runtime dynamic int8 peer, and this project's fp32 and int8 artifacts
(built as scripts/cpu_side_by_side.py builds them), in interleaved rounds (medians). Agreement: Spearman
and top-1 per query of 16 against CrossEncoder. Writes DIR/int8_alternatives.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtimes"), str(REPO / "plugins"), str(REPO / "scripts")]


def weight_only(source: Path, destination: Path) -> None:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from ettin_export.graph.quantize import linear_nodes

    proto = onnx.load(str(source))
    weights = {t.name: t for t in proto.graph.initializer}
    by_name = {n.name: n for n in proto.graph.node}
    added = []
    for name in linear_nodes(proto)[:-2]:  # the head stays fp32
        node = by_name[name]
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)  # Gemm(transB=1): [out, in]
        axis = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
        scale = (np.maximum(np.abs(w).max(axis=1 - axis), 1e-12) / 127.0).astype(np.float32)
        shape = [-1, 1] if axis == 0 else [1, -1]
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        stem = node.input[1]
        added += [numpy_helper.from_array(q, stem + "_int8"), numpy_helper.from_array(scale, stem + "_scale")]
        proto.graph.node.insert(list(proto.graph.node).index(node), helper.make_node(
            "DequantizeLinear", [stem + "_int8", stem + "_scale"], [stem + "_dq"], axis=axis, name=name + "_dq"))
        node.input[1] = stem + "_dq"
    used = {i for n in proto.graph.node for i in n.input}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + added)
    onnx.save(proto, str(destination))


def static_qdq(source: Path, destination: Path, batches) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ettin_export.graph.quantize import linear_nodes

    head = linear_nodes(onnx.load(str(source), load_external_data=False))[-2:]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(source), str(destination), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=head + [f"{h}_MatMul" for h in head])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="17m")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench-results/int8-alternatives"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    import numpy as np
    import onnx
    import onnx.inliner
    import openvino
    from cpu_side_by_side import agreement, build

    from ettin_export.bench.measure import CrossEncoderContender
    from ettin_export.bench.ort_padded import OnnxRuntimeInt8PaddedContender
    from ettin_export.checkpoint import random_checkpoint_dir
    from ettin_export.synthetic.lengths import get_profile, make_pairs
    from ettin_runtime import Reranker
    from ettin_runtime.machine import describe, this_machine
    from ettin_runtime.backends.openvino import OpenVinoReranker
    from ettin_runtime.packing import pack

    machine = this_machine()
    print(f"machine: {describe(machine)}", flush=True)
    folders = {p: build(args.size, p, args.out / f"{args.size}-{p}") for p in ("fp32", "int8")}
    ours = {p: Reranker.load(f, allow_unverified=True) for p, f in folders.items()}
    encoder = ours["fp32"].encoder
    pairs = make_pairs(get_profile("nq-like"), encoder._tokenizer, args.pairs, seed=11)

    def packed(some, tokens=ours["fp32"].max_batch_tokens):  # the runtime's batch budget
        batches, current, count = [], [], 0
        for ids in encoder.encode(some):
            if current and count + len(ids) > tokens:
                batches.append(pack(current))
                current, count = [], 0
            current.append(ids)
            count += len(ids)
        return batches + [pack(current)]

    calibration = [{"input_ids": b.input_ids, "cu_seqlens": b.cu_seqlens}
                   for b in packed(make_pairs(get_profile("nq-like"), encoder._tokenizer, 256, seed=99))]
    fp32_graph = folders["fp32"] / "model.onnx"
    weight_only(fp32_graph, args.out / "weight_only.onnx")
    static_qdq(fp32_graph, args.out / "static.onnx", calibration)

    core = openvino.Core()

    def openvino_scorer(path: Path, extra=None):
        model = core.read_model(onnx.inliner.inline_local_functions(onnx.load(str(path))).SerializeToString())
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                                                     **(extra or {})})
        # the runtime's own OpenVINO reranker around it: the same length-sorted packing as the ettin rows
        fp32 = ours["fp32"]
        reranker = OpenVinoReranker(compiled, fp32.encoder, fp32.artifact, max_batch_tokens=fp32.max_batch_tokens,
                                    max_batch_pairs=fp32.max_batch_pairs, inference_precision="f32",
                                    token_limit=fp32.token_limit)
        scores = reranker.predict

        def layers():  # after a first inference: the primitives are chosen at the first shapes they see
            counts = {}
            for op in compiled.get_runtime_model().get_ops():
                info = op.get_rt_info()
                if "layerType" in info and info["layerType"].astype(str) == "FullyConnected":
                    key = f"{info['runtimePrecision'].astype(str)} {info['primitiveType'].astype(str)}"
                    counts[key] = counts.get(key, 0) + 1
            return counts

        return scores, layers

    lines = [f"{args.size}, random weights, {len(pairs)} NQ-like pairs (seed 11); {describe(machine)}; "
             f"{time.strftime('%Y-%m-%d')}; `{' '.join(['python'] + sys.argv)}`", ""]
    group_scores, group_scorers = {}, {}
    default_group = core.get_property("CPU", "DYNAMIC_QUANTIZATION_GROUP_SIZE")
    lines.append(f"OpenVINO {openvino.__version__}, CPU default DYNAMIC_QUANTIZATION_GROUP_SIZE: {default_group}")
    for group in ("0", "32", "128"):
        scorer, layers = openvino_scorer(args.out / "weight_only.onnx", {"DYNAMIC_QUANTIZATION_GROUP_SIZE": group})
        group_scorers[group], group_scores[group] = scorer, np.asarray(scorer(pairs))
        lines.append(f"weight-only int8, DYNAMIC_QUANTIZATION_GROUP_SIZE={group}: FullyConnected {layers()}")
    moved = max(float(np.max(np.abs(s - group_scores["0"]))) for s in group_scores.values())
    lines += [f"largest score change between group sizes: {moved:.3g} "
              f"({'dynamic quantization ran' if moved else 'none: dynamic quantization never ran'})", ""]
    static_scorer, static_layers = openvino_scorer(args.out / "static.onnx")
    static_scorer(pairs[:8])
    lines += [f"static QDQ int8 under OpenVINO: FullyConnected {static_layers()}", ""]

    checkpoint = str(random_checkpoint_dir(args.size))
    systems = {
        "CrossEncoder fp32 (PyTorch)": CrossEncoderContender(checkpoint, ours["fp32"].max_length, 8, "cpu",
                                                             "float32").predict,
        "ONNX Runtime dynamic int8, padded export (peer)": OnnxRuntimeInt8PaddedContender(
            checkpoint, ours["fp32"].max_length, 8).predict,
        f"ettin fp32 ({ours['fp32'].artifact.engine.runtime})": ours["fp32"].predict,
        "ettin int8 (ONNX Runtime, per-token scales)": ours["int8"].predict,
        "weight-only int8 under OpenVINO (its default group size)": openvino_scorer(args.out / "weight_only.onnx")[0],
        "weight-only int8 under OpenVINO, group size 128": group_scorers["128"],  # compiled once, above
        "static QDQ int8 under OpenVINO": static_scorer,
    }
    scores = {name: np.asarray(predict(pairs)) for name, predict in systems.items()}
    seconds = {name: [] for name in systems}
    for _ in range(args.rounds):
        for name, predict in systems.items():
            start = time.perf_counter()
            predict(pairs)
            seconds[name].append(time.perf_counter() - start)
    speed = {name: len(pairs) / statistics.median(times) for name, times in seconds.items()}
    ce, peer = "CrossEncoder fp32 (PyTorch)", "ONNX Runtime dynamic int8, padded export (peer)"
    lines += ["| system | pairs/s | × CrossEncoder | × padded int8 peer | Spearman / top-1 vs CrossEncoder |",
              "|---|---|---|---|---|"]
    for name in systems:
        agree = agreement(scores[ce], scores[name]) if name != ce else None
        text = "—" if agree is None else f"{agree['spearman']:.3f} / {agree['top1']:.0%}"
        lines.append(f"| {name} | {speed[name]:.1f} | {speed[name] / speed[ce]:.2f} | {speed[name] / speed[peer]:.2f} "
                     f"| {text} |")
    # Batch neighbours: one mid-length pair scored alone, in one packed batch with short pairs (as many of the
    # shortest as fit the batch's token budget), and in one batch with each of 20 longer pairs. The shipped
    # recipe's per-token scales make these identical.
    lengths = [len(ids) for ids in encoder.encode(pairs)]
    order = [int(i) for i in np.argsort(lengths, kind="stable")]
    middle = order[len(order) // 2]
    target, room, short = pairs[middle], ours["fp32"].max_batch_tokens - lengths[middle], []
    for i in order:
        if i != middle and lengths[i] <= room:
            short.append(pairs[i])
            room -= lengths[i]
    longer = [pairs[i] for i in order[len(order) // 2 + 1:][::6][:20]]
    lines += ["", f"one pair ({lengths[middle]} tokens) alone, then in one batch with {len(short)} short pairs, and with "
              f"each of {len(longer)} longer pairs: max |change| of its score (and how many neighbours moved it):"]
    for name in ("ettin int8 (ONNX Runtime, per-token scales)", "weight-only int8 under OpenVINO, group size 128"):
        predict = systems[name]
        alone = float(np.asarray(predict([target]))[0])
        beside_short = abs(float(np.asarray(predict(short + [target]))[-1]) - alone)
        beside_longer = [abs(float(np.asarray(predict([other, target]))[-1]) - alone) for other in longer]
        lines.append(f"- {name}: short pairs {beside_short:.3g}; a longer pair {max(beside_longer):.3g} "
                     f"({sum(change > 1e-4 for change in beside_longer)} of {len(longer)} moved it by > 1e-4)")
    report = "\n".join(lines) + "\n"
    print(report)
    (args.out / "int8_alternatives.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
