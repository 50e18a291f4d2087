"""`ettin-export sizes [--json]`: the six Ettin sizes, their exact configs and parameter counts."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from ettin_export import sizes

    rows = []
    for spec in sizes.SIZES.values():
        rows.append({
            "size": spec.name, "reranker": spec.reranker_id, "backbone": spec.backbone_id,
            "hidden": spec.hidden, "layers": spec.layers, "heads": spec.heads, "head_dim": spec.head_dim,
            "intermediate": spec.intermediate, "global_layers": spec.global_layers(),
            "backbone_params": spec.backbone_params(), "head_params": spec.head_params(),
            "total_params": spec.backbone_params() + spec.head_params(),
            "published_params_m": spec.published_params_m,
        })
    if args.json:
        shared = {
            "vocab_size": sizes.VOCAB_SIZE, "head_dim": sizes.HEAD_DIM, "local_attention": sizes.LOCAL_ATTENTION,
            "local_window_half_width": sizes.LOCAL_ATTENTION // 2,
            "global_attn_every_n_layers": sizes.GLOBAL_ATTN_EVERY_N_LAYERS,
            "global_rope_theta": sizes.GLOBAL_ROPE_THETA, "local_rope_theta": sizes.LOCAL_ROPE_THETA,
            "norm_eps": sizes.NORM_EPS, "max_position_embeddings": sizes.MAX_POSITION_EMBEDDINGS,
            "cls_token_id": sizes.CLS_TOKEN_ID, "sep_token_id": sizes.SEP_TOKEN_ID, "pad_token_id": sizes.PAD_TOKEN_ID,
        }
        print(json.dumps({"shared": shared, "sizes": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Ettin rerankers (cross-encoder/ettin-reranker-<size>-v1)")
    for column in ("size", "hidden", "layers", "heads", "intermediate", "backbone", "head", "total", "published"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["size"], str(row["hidden"]), str(row["layers"]), str(row["heads"]), str(row["intermediate"]),
            f"{row['backbone_params'] / 1e6:.2f}M", f"{row['head_params'] / 1e6:.3f}M",
            f"{row['total_params'] / 1e6:.2f}M", f"{row['published_params_m']}M",
        )
    console = Console()
    console.print(table)
    console.print(
        f"All sizes: vocab {sizes.VOCAB_SIZE}, head_dim {sizes.HEAD_DIM}, local window {sizes.LOCAL_ATTENTION} "
        f"(|i-j| <= {sizes.LOCAL_ATTENTION // 2}), global every {sizes.GLOBAL_ATTN_EVERY_N_LAYERS} layers from 0, "
        f"RoPE theta {sizes.GLOBAL_ROPE_THETA:g} (global and local), max {sizes.MAX_POSITION_EMBEDDINGS} tokens."
    )
    return 0
