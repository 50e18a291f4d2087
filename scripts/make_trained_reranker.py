"""Make a trained ModernBERT (Ettin-shaped) cross-encoder offline, distilled from the packaged all-MiniLM-L6-v2.

    python scripts/make_trained_reranker.py OUT_DIR [--size 32m|17m] [--tiny] [--steps N] [--no-eval]

Writes a sentence-transformers CrossEncoder folder and OUT_DIR/trained_reranker.json (recipe, data, steps,
wall time, held-out NDCG@10 / MRR@10 beside BM25, the teacher and random order). See ettin_export/trained/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ettin_export.trained.maker import FULL_RECIPES, TINY_RECIPE, make_trained_reranker


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(FULL_RECIPES), default="32m")
    parser.add_argument("--tiny", action="store_true", help="the test fixture's recipe (32m config, 2 layers)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = parser.parse_args(argv)
    recipe = TINY_RECIPE if args.tiny else FULL_RECIPES[args.size]
    changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    recipe = dataclasses.replace(recipe, **changes)
    out = make_trained_reranker(args.out_dir, recipe, evaluate_heldout=not args.no_eval)
    record = json.loads((out / "trained_reranker.json").read_text())
    print(json.dumps({k: record.get(k) for k in ("recipe_key", "training", "heldout", "wall_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
