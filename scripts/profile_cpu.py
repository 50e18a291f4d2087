"""Where an ONNX artifact's CPU time goes: ONNX Runtime's own profiler, summed by operator.

    python scripts/profile_cpu.py ARTIFACT [--lengths nq-like] [--pairs 256] [--runs 3] [--allow-unverified]

Runs the artifact's ONNX Runtime reranker on generated pairs of a length profile (as `ettin-export
bench` does) with profiling on, and prints each operator type's share of the kernel time. The first
pass is a warm-up and is left out. ONNX Runtime inlines the VarlenAttention local function, so its
nodes are counted under their own types: in the exported graph the linear layers are `Gemm` and the
attention body's products are `MatMul` (with `Softmax`, `Transpose`, and the masks' `Add`/`Gather`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--lengths", default="nq-like")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--allow-unverified", action="store_true", help="profile a rejected build (OUT.rejected)")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    from tokenizers import Tokenizer

    from ettin_export.synthetic.lengths import load_pairs
    from ettin_runtime import Reranker

    from ettin_runtime.errors import EttinError

    try:  # ONNX Runtime's profiler, whichever runtime the build chose for the artifact
        reranker = Reranker.load(args.artifact, runtime="onnxruntime", allow_unverified=args.allow_unverified)
    except EttinError as error:
        print(f"{args.artifact}: ONNX Runtime cannot run it: {error}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(str(Path(args.artifact) / "tokenizer.json"))
    pairs, description = load_pairs(args.lengths, tokenizer, args.pairs)
    reranker.predict(pairs)  # warm-up, unprofiled

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "ort")
        model_file = reranker.artifact.path(reranker.artifact.engine.file)
        reranker.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        reranker.predict(pairs[:8])
        start = time.perf_counter()
        for _ in range(args.runs):
            reranker.predict(pairs)
        wall = (time.perf_counter() - start) / args.runs
        events = json.loads(Path(reranker.session.end_profiling()).read_text())

    by_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        key = event.get("args", {}).get("op_name", "?")
        by_op[key] += event["dur"]
        calls[key] += 1
    total = sum(by_op.values())
    print(f"{args.artifact}: {len(pairs)} pairs ({description}), {args.runs} profiled passes, "
          f"{wall:.3f} s per pass (profiling on)")
    print(f"{'operator':<28}{'share':>8}{'ms/pass':>10}{'calls/pass':>12}")
    for key, micros in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"{key:<28}{micros / total:>8.1%}{micros / 1000 / args.runs:>10.1f}{calls[key] / args.runs:>12.0f}")
    print(f"{'kernel time':<28}{'':>8}{total / 1000 / args.runs:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
