#!/usr/bin/env python3
"""fp32 and int8 on this CPU, side by side in one process: CrossEncoder, the padded peers and ours.

    python scripts/cpu_side_by_side.py [--size 17m] [--pairs 256] [--rounds 7] [--batch 8] [--out DIR]

Builds the fp32 and int8 artifacts of the exact Ettin config with random weights (speed does not depend on
weight values; random weights have no score margins, so the int8 rank gate fails and its build is timed from
OUT.rejected, marked), then times on the same NQ-like pairs, in interleaved rounds (medians):

    CrossEncoder fp32 (PyTorch, padded, its own length-sorted batches of --batch)
    padded ONNX export of the same modules: ONNX Runtime fp32, OpenVINO fp32, ONNX Runtime dynamic int8
    ettin fp32 (the runtime the build chose) and ettin int8 (per-token activation scales)

Agreement with CrossEncoder: max |Δ| (fp32) and Spearman / top-1 per query of 16 (int8). Prints, and writes
to DIR/side_by_side.{json,md}, the table with the CPU model, its features and class, the command and commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtimes"), str(REPO / "plugins")]


def build(size: str, precision: str, out: Path) -> Path:
    command = ["ettin-export", "build", "--size", size, "--random-weights", "--target", "cpu", "--precision", precision,
               "--out", str(out), "--force", "--quiet"]
    if precision == "int8":  # every linear layer in int8 (random weights fail the gate whatever stays fp32)
        command += ["--int8-max-fp32-layers", "0"]
    code = subprocess.run(command).returncode
    folder = out if code == 0 else out.with_name(out.name + ".rejected")
    if not folder.is_dir():
        raise SystemExit(f"build {size} {precision} wrote nothing (exit {code})")
    return folder


def agreement(reference, scores, group: int = 16) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    reference, scores = np.asarray(reference, np.float64), np.asarray(scores, np.float64)
    spans = range(0, len(reference) - group + 1, group)
    top1 = float(np.mean([np.argmax(reference[i:i + group]) == np.argmax(scores[i:i + group]) for i in spans]))
    return {"max_abs_diff": float(np.max(np.abs(reference - scores))), "spearman": float(spearmanr(reference, scores)[0]),
            "top1": top1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="17m")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8, help="CrossEncoder's and the padded peers' batch size")
    parser.add_argument("--out", type=Path, default=Path("bench-results/side-by-side"))
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from ettin_export.bench.openvino_padded import OpenVinoPaddedContender
    from ettin_export.bench.ort_padded import OnnxRuntimeInt8PaddedContender
    from ettin_export.checkpoint import random_checkpoint_dir
    from ettin_export.synthetic.lengths import get_profile, make_pairs
    from ettin_runtime import Reranker
    from ettin_runtime.machine import describe, this_machine

    machine = this_machine()
    print(f"machine: {describe(machine)}", flush=True)
    folders = {}
    for precision in ("fp32", "int8"):
        out = args.out / f"{args.size}-{precision}"
        folders[precision] = (out if out.is_dir() else out.with_name(out.name + ".rejected")) if args.skip_build \
            else build(args.size, precision, out)
    checkpoint = str(random_checkpoint_dir(args.size))
    rerankers = {p: Reranker.load(f, allow_unverified=True) for p, f in folders.items()}
    max_length = rerankers["fp32"].max_length
    pairs = make_pairs(get_profile("nq-like"), rerankers["fp32"].encoder._tokenizer, args.pairs, seed=11)

    from ettin_export.bench.measure import CrossEncoderContender

    crossencoder = CrossEncoderContender(checkpoint, max_length, args.batch, "cpu", "float32")
    systems = {
        "crossencoder": ("CrossEncoder fp32 (PyTorch)", crossencoder.predict),
        "ort_fp32_padded": ("ONNX Runtime fp32, padded export",
                            OnnxRuntimeInt8PaddedContender(checkpoint, max_length, args.batch, int8=False).predict),
        "openvino_fp32_padded": ("OpenVINO fp32, padded export",
                                 OpenVinoPaddedContender(checkpoint, max_length, args.batch, "fp32").predict),
        "ort_int8_padded": ("ONNX Runtime dynamic int8, padded export",
                            OnnxRuntimeInt8PaddedContender(checkpoint, max_length, args.batch).predict),
        "ettin_fp32": (f"ettin fp32 ({rerankers['fp32'].artifact.engine.runtime})", rerankers["fp32"].predict),
        "ettin_int8": ("ettin int8 (onnxruntime, per-token scales)"
                       + ("" if folders["int8"].name.endswith("int8") else " [gate failed: random weights]"),
                       rerankers["int8"].predict),
    }
    scores = {key: predict(pairs) for key, (_, predict) in systems.items()}  # warm-up and agreement
    seconds = {key: [] for key in systems}
    for _ in range(args.rounds):
        for key, (_, predict) in systems.items():
            start = time.perf_counter()
            predict(pairs)
            seconds[key].append(time.perf_counter() - start)
    speed = {key: len(pairs) / statistics.median(times) for key, times in seconds.items()}
    best = {"fp32": max(("ort_fp32_padded", "openvino_fp32_padded"), key=speed.get), "int8": "ort_int8_padded"}
    rows = ["| system | pairs/s | × CrossEncoder | × best padded peer of its precision | agreement with CrossEncoder |",
            "|---|---|---|---|---|"]
    results = {}
    for key, (name, _) in systems.items():
        precision = "int8" if "int8" in key else "fp32"
        agree = agreement(scores["crossencoder"], scores[key]) if key != "crossencoder" else None
        peer = speed[key] / speed[best[precision]] if key.startswith("ettin") else None
        results[key] = {"name": name, "pairs_per_s": round(speed[key], 1),
                        "x_crossencoder": round(speed[key] / speed["crossencoder"], 2),
                        "x_best_peer": None if peer is None else round(peer, 2), "vs_crossencoder": agree}
        text = "—" if agree is None else (f"max \\|Δ\\| {agree['max_abs_diff']:.2g}" if precision == "fp32" else
                                        f"Spearman {agree['spearman']:.3f}, top-1 {agree['top1']:.0%}")
        rows.append(f"| {name} | {speed[key]:.1f} | {speed[key] / speed['crossencoder']:.2f} | "
                    f"{'' if peer is None else f'{peer:.2f} ({systems[best[precision]][0]})'} | {text} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    header = (f"{args.size}, random weights, {len(pairs)} NQ-like pairs (seed 11), batch {args.batch} for the padded "
              f"systems, {args.rounds} interleaved rounds, medians; {describe(machine)}; "
              f"{time.strftime('%Y-%m-%d')}, commit {commit}; `{' '.join(['python'] + sys.argv)}`")
    table = header + "\n\n" + "\n".join(rows) + "\n"
    print(table)
    (args.out / "side_by_side.md").write_text(table)
    (args.out / "side_by_side.json").write_text(json.dumps(
        {"machine": machine, "size": args.size, "pairs": len(pairs), "rounds": args.rounds, "batch": args.batch,
         "commit": commit, "results": results, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
