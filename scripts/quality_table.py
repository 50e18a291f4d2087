#!/usr/bin/env python3
"""Ranking quality and speed of every CPU precision of one checkpoint, beside CrossEncoder and the peers.

    python scripts/quality_table.py CHECKPOINT --data BEIR_DIR --out DIR [--gate-queries 40] [--top-k 30]

1. Builds the fp32, int8 and bf16 artifacts with `ettin-export build CHECKPOINT --target cpu --precision P
   --parity-pairs GATE` at their real gates, GATE being the first --gate-queries evaluated queries with
   their BM25 candidates (pairs like the traffic). bf16 is built only on a CPU with bf16 instructions
   (AVX512_BF16 / AMX): elsewhere OpenVINO computes it in fp32 and a gate would judge fp32 arithmetic.
2. Reranks every evaluated query's BM25 top --top-k with CrossEncoder (fp32, PyTorch), each artifact that
   passed (or was rejected: scored from OUT.rejected, marked), ONNX Runtime's dynamic int8 of a padded
   export of the same modules, and OpenVINO bf16 on that export (bf16 CPUs only): NDCG@10, MRR@10 and
   agreement with CrossEncoder (Spearman over all pairs, top-1, top-10 overlap) on the same candidates.
3. Pairs/s of each on --speed-pairs of those pairs, interleaved rounds, medians, CrossEncoder at batch 16.
Writes DIR/quality.json and DIR/quality.md (the table, with the CPU model and features and the command).
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


def build(checkpoint: Path, precision: str, out: Path, gate: Path) -> dict:
    command = ["ettin-export", "build", str(checkpoint), "--target", "cpu", "--precision", precision,
               "--parity-pairs", str(gate), "--out", str(out), "--force", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    folder = out if proc.returncode == 0 else out.with_name(out.name + ".rejected")
    result = {"command": " ".join(command), "exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
              "folder": str(folder) if folder.is_dir() else None}
    parity = folder / "parity.json"
    if parity.is_file():
        report = json.loads(parity.read_text())
        result.update(passed=report["passed"], gate=report["metrics"], failures=report.get("failures", []),
                      candidate=report["candidate"])
    else:
        result["stderr"] = proc.stderr[-2000:]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder (queries.jsonl, corpus.jsonl, qrels/)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gate-queries", type=int, default=40, help="queries of the build gates' pair set")
    parser.add_argument("--top-k", type=int, default=30, help="BM25 candidates reranked per query")
    parser.add_argument("--speed-pairs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-build", action="store_true", help="use the artifacts already under --out")
    args = parser.parse_args(argv)

    import numpy as np
    from sentence_transformers import CrossEncoder

    from ettin_export.bench.measure import cpu_description
    from ettin_runtime import machine
    from ettin_export.evaluation.beir import load_beir
    from ettin_export.evaluation.rerank import System, agreement, evaluate, first_stage_candidates, write_gate_pairs
    from ettin_runtime import Reranker

    args.out.mkdir(parents=True, exist_ok=True)
    native_bf16 = machine.native_bf16()
    data = load_beir(args.data)
    print(f"machine: {cpu_description()}", flush=True)
    candidates = first_stage_candidates(data, args.top_k)
    gate = write_gate_pairs(data, candidates, args.gate_queries, args.out / "gate_pairs.jsonl")

    precisions = ["fp32", "int8"] + (["bf16"] if native_bf16 else [])
    builds = {}
    for precision in precisions:
        out = args.out / f"artifact-{precision}"
        if args.skip_build:
            folder = out if out.is_dir() else out.with_name(out.name + ".rejected")
            report = json.loads((folder / "parity.json").read_text())
            builds[precision] = {"folder": str(folder), "passed": report["passed"], "gate": report["metrics"],
                                 "failures": report.get("failures", [])}
        else:
            print(f"building {precision} ...", flush=True)
            builds[precision] = build(args.checkpoint, precision, out, gate)
        print(f"  {precision}: gate {'passed' if builds[precision].get('passed') else 'FAILED'} "
              f"{builds[precision].get('gate')}", flush=True)

    crossencoder = CrossEncoder(str(args.checkpoint), device="cpu", activation_fn=__import__("torch").nn.Identity())
    systems = [System("crossencoder", "CrossEncoder fp32 (PyTorch)",
                      lambda pairs: crossencoder.predict(pairs, batch_size=16, show_progress_bar=False,
                                                         convert_to_numpy=True))]
    opened = []
    for precision, result in builds.items():
        if result.get("folder"):
            reranker = Reranker.load(result["folder"], allow_unverified=not result.get("passed"))
            opened.append(reranker)
            label = f"ettin {precision} ({reranker.artifact.engine.runtime})" + ("" if result.get("passed") else " [gate failed]")
            systems.append(System(f"ettin_{precision}", label, reranker.predict))
    from ettin_export.bench.ort_padded import OnnxRuntimeInt8PaddedContender

    max_length = crossencoder.max_seq_length  # (max_length: deprecated in sentence-transformers 6)
    peer_int8 = OnnxRuntimeInt8PaddedContender(str(args.checkpoint), max_length, 16)
    systems.append(System("peer_ort_int8", "ONNX Runtime dynamic int8, padded export", peer_int8.predict))
    if native_bf16:
        from ettin_export.bench.openvino_padded import OpenVinoPaddedContender

        peer_bf16 = OpenVinoPaddedContender(str(args.checkpoint), max_length, 16, "bf16")
        systems.append(System("peer_openvino_bf16", "OpenVINO bf16, padded export", peer_bf16.predict))

    print(f"reranking {len(data.evaluated_query_ids)} queries x top {args.top_k} with {len(systems)} systems ...",
          flush=True)
    report = evaluate(data, candidates, systems, recall_at=[args.top_k], first_stage_name="BM25")
    scores, owners = report.pop("scores"), report.pop("owners")
    for system in systems[1:]:
        report[system.key]["vs_crossencoder"] = agreement(owners, scores["crossencoder"], scores[system.key])

    pairs = [(data.queries[q], data.document(d)) for q, d in owners[: args.speed_pairs]]
    seconds = {s.key: [] for s in systems}
    for system in systems:
        system.predict(pairs[:16])  # warm-up
    for _ in range(args.rounds):
        for system in systems:
            start = time.perf_counter()
            system.predict(pairs)
            seconds[system.key].append(time.perf_counter() - start)
    for system in systems:
        report[system.key]["pairs_per_s"] = round(len(pairs) / statistics.median(seconds[system.key]), 1)
    base = report["crossencoder"]["pairs_per_s"]
    for system in systems:
        report[system.key]["x_crossencoder"] = round(report[system.key]["pairs_per_s"] / base, 2)
    report.update(machine=cpu_description(), builds=builds, native_bf16=native_bf16, speed_pairs=len(pairs),
                  rounds=args.rounds, command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d"))
    (args.out / "quality.json").write_text(json.dumps(report, indent=1, default=str))

    rows = ["| system | NDCG@10 | MRR@10 | Spearman vs CE | top-1 vs CE | top-10 vs CE | pairs/s | × CE |",
            "|---|---|---|---|---|---|---|---|",
            f"| BM25 (first stage) | {report['first_stage']['ndcg@10']:.4f} | {report['first_stage']['mrr@10']:.4f} "
            "| | | | | |"]
    for system in systems:
        entry = report[system.key]
        versus = entry.get("vs_crossencoder")
        agree = (f"{versus['spearman']:.4f} | {versus['top1_agreement']:.1%} | {versus['top10_overlap']:.3f}"
                 if versus else "— | — | —")
        rows.append(f"| {system.name} | {entry['ndcg@10']:.4f} | {entry['mrr@10']:.4f} | {agree} | "
                    f"{entry['pairs_per_s']} | {entry['x_crossencoder']} |")
    if not native_bf16:
        rows.append("| ettin bf16, OpenVINO bf16 padded | not measured: this CPU has no bf16 instructions | | | | | | |")
    text = (f"{report['evaluated_queries']} queries x BM25 top {args.top_k} ({report['pairs']} pairs); speed on "
            f"{len(pairs)} of those pairs, {args.rounds} interleaved rounds, medians; {cpu_description()}; "
            f"{report['date']}.\n\n" + "\n".join(rows) + "\n")
    (args.out / "quality.md").write_text(text)
    print(text)
    for reranker in opened:
        reranker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
