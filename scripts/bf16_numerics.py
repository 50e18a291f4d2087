#!/usr/bin/env python3
"""What bf16 rounding does to a model that ranks, measured on any CPU: the calibration of the bf16 gates.

    python scripts/bf16_numerics.py [CHECKPOINT] [--gate-queries 30] [--gate-candidates 20] [--top-k 30]
                                    [--json OUT.json]

A CPU without bf16 instructions cannot build a bf16 artifact (the build refuses: OpenVINO would compute
fp32), but PyTorch computes real bf16 arithmetic on any CPU, slowly. This script scores, with the packed
PyTorch model (CHECKPOINT: default the maker's tiny trained fixture, made or taken from the cache):

- fp32; bf16 (every op, PyTorch's own rounding); bf16 with layer 0's Wqkv cast through fp8 e4m3 (a wrong
  cast: a porting mistake); fp32 plus Gaussian noise of several sizes (per-pair errors of known size);
- on the gate pairs (the first --gate-queries held-out queries with their BM25 candidates): the CPU bf16
  gate's verdict against the fp64 anchor, and its top-1 / top-10 agreement strictly and up to bf16 ties;
- on the held-out set (every query, BM25 top --top-k): NDCG@10 and MRR@10, noise averaged over 5 seeds.

A bound is right when rounding noise passes and a drop a user would notice (NDCG@10 >= 0.005) fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtimes")]

NOISE = (0.05, 0.1, 0.2, 0.5)
SEEDS = 5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a CrossEncoder folder (default: the tiny trained fixture)")
    parser.add_argument("--gate-queries", type=int, default=30)
    parser.add_argument("--gate-candidates", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from ettin_export import targets
    from ettin_export.build.common import BuildOptions, reference_model
    from ettin_export.checkpoint import load_checkpoint
    from ettin_export.evaluation.beir import load_beir
    from ettin_export.evaluation.rerank import first_stage_candidates, write_gate_pairs
    from ettin_export.parity.references import packed_scores
    from ettin_export.parity.rule import ParityMetrics
    from ettin_export.progress import Steps
    from ettin_export.trained.maker import TINY_RECIPE, evaluate, heldout_beir_dir, trained_reranker_dir
    from ettin_runtime.machine import describe

    folder = args.checkpoint or str(trained_reranker_dir(TINY_RECIPE, evaluate_heldout=False))
    heldout = heldout_beir_dir()
    data = load_beir(heldout)
    candidates = first_stage_candidates(data, args.gate_candidates)
    gate = write_gate_pairs(data, candidates, args.gate_queries, Path(tempfile.mkdtemp()) / "gate.jsonl")
    checkpoint = load_checkpoint(folder, max_length=256)
    target = targets.get_target("cpu")
    options = BuildOptions(out=None, target=target, max_length=256, precision="bf16", parity_pairs=str(gate))
    steps = Steps("bf16 numerics")
    fp32, run = reference_model(checkpoint, options, steps)
    bf16 = checkpoint.build_model(torch.bfloat16, "cpu")
    fp8 = checkpoint.build_model(torch.bfloat16, "cpu")
    with torch.no_grad():
        weight = fp8.layers[0].attn.Wqkv.weight
        weight.copy_(weight.to(torch.float8_e4m3fn).to(torch.bfloat16))

    def model_scorer(model, known=None):
        """The model's scores of a pair list, each list scored once (the gate's, the held-out's); `known`
        seeds scores already computed."""
        memo: dict[int, np.ndarray] = dict(known or {})

        def scores(pairs):
            key = hash(tuple(pairs))
            if key not in memo:
                memo[key] = packed_scores(model, run.encoder, pairs)
            return memo[key]
        return scores

    fp32_scores = model_scorer(fp32)
    # the bf16 gate's own reference is this very computation on the gate pairs (PyTorch bf16 on the CPU)
    bf16_gate = {hash(tuple(run.pairs)): run.lowp_references().own}

    def noisy(sigma, seed):
        rng = np.random.default_rng(seed)
        return lambda pairs: fp32_scores(pairs) + rng.normal(0.0, sigma, len(pairs))

    systems = {"fp32 (PyTorch)": [fp32_scores], "bf16 (PyTorch, every op)": [model_scorer(bf16, bf16_gate)],
               "bf16, layer 0 Wqkv through fp8 e4m3": [model_scorer(fp8)]}
    systems.update({f"fp32 + noise sigma {sigma:g}": [noisy(sigma, seed) for seed in range(SEEDS)] for sigma in NOISE})
    bounds = target.bounds_for("bf16")
    rows = {}
    for name, scorers in systems.items():
        with steps.step(f"{name}: gate pairs and held-out queries"):
            scores = scorers[0](run.pairs)
            report = run.judge(target, name, scores, precision="bf16")
            strict = ParityMetrics.compute(run.references.anchor, scores, run.spans)
            quality = [evaluate(scorer, heldout, top_k=args.top_k)["reranker"] for scorer in scorers]
        m = report.metrics
        rows[name] = {
            "gate_passed": report.passed, "failures": report.failures, "spearman": m.spearman,
            "top1": m.top1_agreement, "top10": m.top10_overlap, "top1_strict": strict.top1_agreement,
            "top10_strict": strict.top10_overlap, "max_abs_diff": m.max_abs_diff, "mean_abs_diff": m.mean_abs_diff,
            "ndcg@10": float(np.mean([q["ndcg@10"] for q in quality])),
            "mrr@10": float(np.mean([q["mrr@10"] for q in quality])), "seeds": len(scorers)}
    base = rows["fp32 (PyTorch)"]["ndcg@10"]
    print(f"\n{describe()}; checkpoint {folder}; gate {len(run.pairs)} pairs ({len(run.spans)} queries); "
          f"held-out {args.top_k} BM25 candidates a query; bounds: Spearman >= {bounds.min_spearman:g}, top-1 >= "
          f"{bounds.min_top1_agreement:g}, top-10 >= {bounds.min_top10_overlap:g} (ties: {bounds.tie_bits} bits), or "
          f"{bounds.rank_ratio:g} x the own PyTorch bf16's disagreement, floors {bounds.rank_floor}\n")
    print("| scores | gate | Spearman | top-1 (strict) | top-10 (strict) | mean abs diff | NDCG@10 | Δ NDCG@10 | MRR@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {'pass' if r['gate_passed'] else 'FAIL'} | {r['spearman']:.5f} | {r['top1']:.1%} "
              f"({r['top1_strict']:.1%}) | {r['top10']:.3f} ({r['top10_strict']:.3f}) | {r['mean_abs_diff']:.3g} | "
              f"{r['ndcg@10']:.4f} | {r['ndcg@10'] - base:+.4f} | {r['mrr@10']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "checkpoint": folder, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
