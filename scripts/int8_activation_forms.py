#!/usr/bin/env python3
"""What int8's activation quantizers cost on this CPU: the shipped per-token form beside two others.

    python scripts/int8_activation_forms.py FP32_ARTIFACT [--rounds 7] [--pairs 256] [--out DIR]

Quantizes FP32_ARTIFACT's graph three ways (every backbone linear layer int8, 7-bit weights per output
channel; only the activations' scales differ) and times each through the artifact's ONNX Runtime reranker
(its packing and session options), in interleaved rounds, medians, on NQ-like pairs (seed 11):

  per token   the shipped recipe (ettin_export.graph.quantize.per_token_activations): a scale per token,
              eight nodes per quantizer (Abs, ReduceMax, Max, Div, Reshape, Shape, Expand, QuantizeLinear)
  per batch   ONNX Runtime's DynamicQuantizeLinear, one scale per packed batch (fused with the product into
              DynamicQuantizeMatMul): scores move with their batch neighbours, so it is not shippable; timed
              as the speed the per-token form gives up
  static      one QuantizeLinear with a constant scale per tensor (0.05 here: speed does not depend on its
              value, scores do, so only the speed is meaningful), the form calibrated scales would take

Prints the CPU, then each form's pairs/s with every round. Random or trained weights alike (speed only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtimes"), str(REPO / "plugins")]


def static_form(per_batch: Path, destination: Path, scale: float = 0.05) -> None:
    """`per_batch`'s graph with each DynamicQuantizeLinear replaced by QuantizeLinear(x, scale, 128)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(per_batch))
    nodes = []
    for node in proto.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        quantized, scale_name, zero_name = node.output
        proto.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                                        numpy_helper.from_array(np.array(128, np.uint8), zero_name)])
        nodes.append(helper.make_node("QuantizeLinear", [node.input[0], scale_name, zero_name], [quantized],
                                      name=node.name + "_static"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    constants = {t.name for t in proto.graph.initializer}
    kept = [v for v in proto.graph.value_info if v.name not in constants]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    onnx.save(proto, str(destination))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="an fp32 CPU artifact (ettin-export build --target cpu)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="keep the three graphs here")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from ettin_export.graph.quantize import quantize_int8
    from ettin_export.synthetic.lengths import get_profile, make_pairs
    from ettin_runtime import Reranker
    from ettin_runtime.backends.onnxruntime import cpu_batch_tokens
    from ettin_runtime.errors import EttinError
    from ettin_runtime.machine import describe, this_machine

    print(f"machine: {describe(this_machine())}", flush=True)
    try:  # before any work: a folder that is no fp32 ONNX artifact stops here, with the runtime's reason
        reranker = Reranker.load(args.artifact, runtime="onnxruntime", allow_unverified=True,
                                 max_batch_tokens=cpu_batch_tokens(None, precision="int8"))
    except EttinError as error:
        print(f"{args.artifact}: not an fp32 CPU artifact ONNX Runtime can run: {error}", file=sys.stderr)
        return 2
    if reranker.artifact.precision != "fp32":
        print(f"{args.artifact} holds the {reranker.artifact.precision} build; give the fp32 one "
              "(its graph is the one each form quantizes).", file=sys.stderr)
        return 2
    scratch = None if args.out else tempfile.TemporaryDirectory()
    out = args.out or Path(scratch.name)
    out.mkdir(parents=True, exist_ok=True)
    source = reranker.artifact.path(reranker.artifact.engine.file)
    quantize_int8(source, out / "per_token.onnx")
    quantize_int8(source, out / "per_batch.onnx", per_token=False)
    static_form(out / "per_batch.onnx", out / "static.onnx")

    options = reranker.session.get_session_options()
    pairs = make_pairs(get_profile("nq-like"), reranker.encoder._tokenizer, args.pairs, seed=11)
    forms = ("per_token", "per_batch", "static")
    sessions = {f: ort.InferenceSession(str(out / f"{f}.onnx"), options, providers=["CPUExecutionProvider"])
                for f in forms}
    seconds = {f: [] for f in forms}
    for form in forms:  # warm-up
        reranker.session = sessions[form]
        reranker.predict(pairs[:32])
    for _ in range(args.rounds):
        for form in forms:
            reranker.session = sessions[form]
            start = time.perf_counter()
            reranker.predict(pairs)
            seconds[form].append(time.perf_counter() - start)
    print(f"{len(pairs)} NQ-like pairs (seed 11), batches of {reranker.max_batch_tokens} tokens, {args.rounds} "
          "interleaved rounds, medians")
    for form in forms:
        rounds = ", ".join(f"{len(pairs) / s:.1f}" for s in seconds[form])
        print(f"{form.replace('_', ' '):<10} {len(pairs) / statistics.median(seconds[form]):7.1f} pairs/s  (rounds: {rounds})")
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
