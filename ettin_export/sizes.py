"""The six Ettin rerankers as data: one place for their hub ids, exact configs and published figures.

Every other module (checkpoints, export, build presets, bench, the CLI) reads the model facts from here.
Sources: ../shared/reference/ettin-models.md (BLOG, ETTIN-GH yamls, model cards).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ettin_runtime.errors import EttinError

# Shared by all six sizes (ettin-models.md §2.1).
VOCAB_SIZE = 50368
HEAD_DIM = 64
LOCAL_ATTENTION = 128  # full window width; a local layer sees |i - j| <= LOCAL_ATTENTION // 2
GLOBAL_ATTN_EVERY_N_LAYERS = 3  # layer i is global iff i % 3 == 0
GLOBAL_ROPE_THETA = 160_000.0
LOCAL_ROPE_THETA = 160_000.0  # NOT ModernBERT's 10000: transformers v5 defaults to 10000 when omitted
NORM_EPS = 1e-5
MAX_POSITION_EMBEDDINGS = 7999
CLS_TOKEN_ID = 50281
SEP_TOKEN_ID = 50282
PAD_TOKEN_ID = 50283


@dataclass(frozen=True)
class EttinSize:
    """One Ettin reranker: identity, exact backbone shape and the figures published for it."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    published_params_m: float  # BLOG "Architecture Details", backbone + head (nominal)
    published_backbone_m: float  # derived in ettin-models.md §1; equals the Hub badge where one exists
    published_head_m: float
    blog_h100_pairs_per_s: int  # BLOG §4.2: ST CrossEncoder, bf16 + FA2 unpadded, H100

    @property
    def reranker_id(self) -> str:
        return f"cross-encoder/ettin-reranker-{self.name}-v1"

    @property
    def backbone_id(self) -> str:
        return f"jhu-clsp/ettin-encoder-{self.name}"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def global_layers(self) -> list[int]:
        return [i for i in range(self.layers) if i % GLOBAL_ATTN_EVERY_N_LAYERS == 0]

    def modernbert_config(self, num_hidden_layers: int | None = None) -> dict:
        """Keyword arguments for transformers' ModernBertConfig, written in the legacy keys the
        released checkpoints use, with both rotary thetas explicit (see LOCAL_ROPE_THETA)."""
        return {
            "architectures": ["ModernBertModel"],
            "model_type": "modernbert",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers if num_hidden_layers is None else num_hidden_layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.intermediate,
            "hidden_activation": "gelu",
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "norm_eps": NORM_EPS,
            "norm_bias": False,
            "attention_bias": False,
            "mlp_bias": False,
            "local_attention": LOCAL_ATTENTION,
            "global_attn_every_n_layers": GLOBAL_ATTN_EVERY_N_LAYERS,
            "global_rope_theta": GLOBAL_ROPE_THETA,
            "local_rope_theta": LOCAL_ROPE_THETA,
            "cls_token_id": CLS_TOKEN_ID,
            "sep_token_id": SEP_TOKEN_ID,
            "pad_token_id": PAD_TOKEN_ID,
            "bos_token_id": CLS_TOKEN_ID,
            "eos_token_id": SEP_TOKEN_ID,
        }

    def backbone_params(self) -> int:
        return backbone_param_count(
            vocab=VOCAB_SIZE, hidden=self.hidden, layers=self.layers, intermediate=self.intermediate
        )

    def head_params(self) -> int:
        return head_param_count(self.hidden)

    def windows(self) -> tuple[int, ...]:
        """Per layer: -1 for a global layer (every third from 0), else the local half-width."""
        return tuple(-1 if layer % GLOBAL_ATTN_EVERY_N_LAYERS == 0 else LOCAL_ATTENTION // 2
                     for layer in range(self.layers))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of pairs of `seq_len` tokens (forward_flops)."""
        return forward_flops(self.hidden, self.intermediate, self.windows(), np.array([seq_len])) / seq_len


def forward_flops(hidden: int, intermediate: int, windows, lengths) -> float:
    """Forward FLOPs of pairs of these lengths (2 per multiply-add): per layer Wqkv, Wo and the GeGLU MLP
    on every token, and QK^T + PV over the keys each token sees (its whole pair on global layers, at
    most 2 x window + 1 on local ones); the embedding lookup and the one-token head are negligible."""
    lengths = np.asarray(lengths, dtype=np.float64)
    dense = 2 * (4 * hidden * hidden + 3 * hidden * intermediate)
    total = 0.0
    for window in windows:
        seen = lengths if window < 0 else np.minimum(lengths, 2 * window + 1)
        total += float(np.sum(lengths * (dense + 4 * hidden * seen)))
    return total


def backbone_param_count(*, vocab: int, hidden: int, layers: int, intermediate: int) -> int:
    """ModernBERT backbone without biases: embedding + its LayerNorm, per layer Wqkv, Wo, GeGLU Wi/Wo and
    two LayerNorms (layer 0 has no attention pre-norm), and the final LayerNorm."""
    per_layer = 3 * hidden * hidden + hidden * hidden + hidden * 2 * intermediate + intermediate * hidden
    norms = (2 * layers - 1) * hidden
    return vocab * hidden + hidden + layers * per_layer + norms + hidden


def head_param_count(hidden: int) -> int:
    """Sentence-transformers head: Dense(H, H, no bias) -> LayerNorm(H, with bias) -> Dense(H, 1)."""
    return hidden * hidden + 2 * hidden + hidden + 1


SIZES: dict[str, EttinSize] = {
    s.name: s
    for s in (
        EttinSize("17m", 256, 7, 4, 384, 17.6, 16.80, 0.066, 7517),
        EttinSize("32m", 384, 10, 6, 576, 32.8, 31.88, 0.149, 6602),
        EttinSize("68m", 512, 19, 8, 768, 68.6, 68.14, 0.264, 4913),
        EttinSize("150m", 768, 22, 12, 1152, 150.9, 149.01, 0.592, 3237),
        EttinSize("400m", 1024, 28, 16, 2624, 401.6, 394.78, 1.052, 1738),
        EttinSize("1b", 1792, 28, 28, 3840, 1000.0, 1028.05, 3.217, 928),
    )
}


class UnknownSizeError(EttinError, ValueError):
    pass


def get_size(name: str) -> EttinSize:
    key = name.strip().lower()
    if key not in SIZES:
        raise UnknownSizeError(
            f"Unknown Ettin size {name!r}. Known sizes: {', '.join(SIZES)}. "
            "For another ModernBERT reranker pass its folder or hub id "
            "(`ettin-export build PATH_OR_HUB_ID`) instead of --size."
        )
    return SIZES[key]
