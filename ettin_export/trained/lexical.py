"""A lexical-match initialisation of the student: weights that make a ModernBERT cross-encoder rank before
any training step, so distillation starts from a model that ranks instead of the uniform-score plateau.

A cross-encoder learned from scratch has to discover query-document interaction through the CLS token;
on 2 CPU cores it stays at the uniform-score plateau for the few hundred steps a 30-minute budget allows
(docs/trained-reranker.md, "Recipes tried"). This module writes, into Ettin's architecture unchanged (same
config, same tensors, same shapes), weights that compute an idf-weighted, saturating exact-match score:

* embeddings (rows of norm sqrt(hidden), zero mean, so the embedding LayerNorm leaves them as they are):
  a few structured dimensions - a random unit "match key" per content token scaled by RHO (content:
  alphanumeric, >= 2 characters, in < 5 % of the training documents), a constant, a content flag, a [CLS]
  flag, a [SEP] flag, log(idf) - and in the rest MiniLM's trained word embeddings (their top principal
  directions), the student's semantic material for distillation;
* layer 0 (global attention), head 0: query = key = the match key on the lowest-frequency rotary pairs
  (rotation < 0.3 rad over 256 positions), so a content token attends to its own copies with logit S, and
  to [CLS] with the same logit S (a sink, on the lowest rotary pair): the mass on [CLS], A = 1 / (2 + n),
  falls from 1/2 with the n other copies of the token anywhere in the pair;
* layer 0, head 1: attention to [SEP] with a logit -sin(θ·(s - t)) (one rotary pair used as a signed
  position difference, θ·max_positions < π), so D ≈ 1 for tokens after the first [SEP] (the document) and 0 before it;
* layer 1 (local attention, window ±64: [CLS] sees the whole query): [CLS] averages 1/2 - A over the query's
  content tokens, weighted by idf (attention logit log idf - 12·D), and writes it to one dimension F;
* head: Dense = identity (GELU after), LayerNorm, classifier = ZF·HEAD on F. Every other weight is
  transformers' initialisation times NOISE, small but trainable, and deeper layers pass F on.

The score is thus Σ_query idf(t)·(1/2 - 1/(2 + n_t)) / Σ idf(t): BM25's idf and a saturating term frequency,
without length normalisation. Distillation then trains every weight (the semantic dimensions included).
"""

from __future__ import annotations

import math

import numpy as np

HEAD_DIM = 64
# residual layout: dimensions 0..39 structured, 40.. MiniLM's embeddings
KEY = slice(0, 28)
CONST, CONTENT, ISCLS, ASLOT, FSLOT, LOGW, ISSEP, DSLOT, SIGMA = 28, 30, 31, 32, 33, 34, 35, 36, 29
STRUCTURED = 40
# rotary pairs (j, j + 32) of a head: inverse frequency theta ** (-j / 32)
KEY_PAIRS = list(range(17, 31))
SINK_PAIR = 31
SEP_PAIRS = range(12, 17)  # the [SEP] detector's candidates: the first whose rotation stays below pi
CONTENT_DF = 0.05
LOGW_SCALE = 4.0  # log(idf) is stored / 4 in the residual


def token_weights(tokenizer, documents: list[str], vocab_size: int, max_df: float = CONTENT_DF):
    """BM25's idf per token id over the training documents, and which ids are content tokens."""
    df = np.zeros(vocab_size)
    for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
        for i in set(encoding.ids):
            df[i] += 1
    n = len(documents)
    idf = np.log((n - df + 0.5) / (df + 0.5) + 1.0)
    content = np.zeros(vocab_size, bool)
    for token, i in tokenizer.get_vocab().items():
        text = token[2:] if token.startswith("##") else token
        if i < vocab_size and text.isalnum() and len(text) >= 2 and df[i] / n < max_df:
            content[i] = True
    return idf, content


def construct(model, idf: np.ndarray, content: np.ndarray, *, S: float = 12.0, RHO: float = 4.0,
              ZF: float = 20.0, HEAD: float = 1.0, NOISE: float = 0.1, ZSEP: float = 10.0, seed: int = 0,
              max_positions: int = 256) -> dict:
    """Write the lexical-match weights into a sentence-transformers CrossEncoder (the student) in place.

    max_positions: the longest pair the model will see (its folder's max_seq_length); the [SEP] detector's
    rotary pair is chosen so that its rotation over that distance stays below pi (beyond it the sign of the
    position difference would wrap and query tokens would read as document tokens)."""
    import torch

    from ettin_export.trained.student import backbone_of

    backbone = backbone_of(model)
    config = backbone.config
    hidden, vocab = config.hidden_size, config.vocab_size
    if config.hidden_size // config.num_attention_heads != HEAD_DIM or config.num_hidden_layers < 2:
        raise ValueError("the lexical initialisation needs 64-dimensional heads and at least 2 layers")
    if config.layer_types[0] != "full_attention" or config.layer_types[1] != "sliding_attention":
        raise ValueError("the lexical initialisation needs a global layer 0 and a local layer 1 (Ettin's pattern)")
    theta = float(config.rope_parameters["full_attention"]["rope_theta"])
    sep_pair = next((j for j in SEP_PAIRS if theta ** (-j / 32) * max_positions < 0.95 * math.pi), None)
    if sep_pair is None:
        raise ValueError(f"the lexical initialisation's [SEP] detector covers at most "
                         f"{int(0.95 * math.pi / theta ** (-SEP_PAIRS[-1] / 32))} positions at rope_theta {theta:g}; "
                         f"got max_positions {max_positions}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _embeddings(backbone, idf, content, RHO, generator)
        for layer in backbone.layers:
            for linear in (layer.attn.Wqkv, layer.attn.Wo, layer.mlp.Wi, layer.mlp.Wo):
                linear.weight.mul_(NOISE)
            for norm in (layer.attn_norm, layer.mlp_norm):
                if hasattr(norm, "weight"):
                    norm.weight.fill_(1.0)
        backbone.final_norm.weight.fill_(1.0)
        _layer0(backbone.layers[0], hidden, S, RHO, ZSEP, theta, sep_pair)
        _layer1(backbone.layers[1], hidden, ZF)
        dense, norm, classifier = model[2].linear, model[3].norm, model[4].linear
        dense.weight.copy_(torch.eye(hidden))
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        classifier.weight.zero_()
        classifier.weight[0, FSLOT] = HEAD
        classifier.bias.zero_()
    return {"init": "lexical", "sep_pair": sep_pair, "max_positions": max_positions, "S": S, "RHO": RHO, "ZF": ZF, "HEAD": HEAD, "NOISE": NOISE, "ZSEP": ZSEP,
            "content_tokens": int(content.sum()), "content_max_df": CONTENT_DF}


def _embeddings(backbone, idf, content, rho, generator):
    import torch

    config = backbone.config
    table = backbone.embeddings.tok_embeddings.weight
    vocab, hidden = table.shape
    old = table.detach().clone()
    is_content = torch.as_tensor(content)
    weight = torch.where(is_content, torch.as_tensor(idf, dtype=torch.float32).clamp(min=1e-3), torch.tensor(1e-3))
    key = torch.randn(vocab, KEY.stop - KEY.start, generator=generator)
    key = key / key.norm(dim=1, keepdim=True)
    struct = torch.zeros(vocab, STRUCTURED)
    struct[:, KEY] = torch.where(is_content[:, None], rho * key, torch.zeros_like(key))
    struct[:, CONST] = 4.0
    struct[:, SIGMA] = is_content.float()
    struct[:, CONTENT] = 0.5 * is_content.float()
    struct[:, LOGW] = torch.log(weight) / LOGW_SCALE
    struct[config.cls_token_id, ISCLS] = 1.0
    struct[config.cls_token_id, LOGW] = math.log(1e-3) / LOGW_SCALE
    struct[config.sep_token_id, ISSEP] = 4.0
    # the rest: the seeded (MiniLM) embeddings' top principal directions, so that every row has zero mean
    # and norm sqrt(hidden) and the embedding LayerNorm (no bias, weight 1) is the identity on it
    rest = hidden - STRUCTURED
    centred = old - old.mean(0, keepdim=True)
    _, _, vt = torch.linalg.svd(centred[: min(vocab, 30522)], full_matrices=False)
    fill = centred @ vt[:rest].T
    fill = fill - fill.mean(1, keepdim=True)
    fill = fill / fill.norm(dim=1, keepdim=True).clamp(min=1e-6)
    offset = -struct.sum(1) / rest
    scale = (hidden - (struct**2).sum(1) - rest * offset**2).clamp(min=1.0).sqrt()
    table.copy_(torch.cat([struct, fill * scale[:, None] + offset[:, None]], 1))
    backbone.embeddings.norm.weight.fill_(1.0)


def _zero_head(qkv, hidden, head):
    rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    for part in range(3):
        qkv[part * hidden:(part + 1) * hidden][rows] = 0.0


def _layer0(layer, hidden, s, rho, zsep, theta, sep_pair):
    qkv = layer.attn.Wqkv.weight  # (3 hidden, hidden): query rows, key rows, value rows
    q, k, v = qkv[:hidden], qkv[hidden:2 * hidden], qkv[2 * hidden:]
    _zero_head(qkv, hidden, 0)
    _zero_head(qkv, hidden, 1)
    # head 0: copies of a content token (logit s), and the [CLS] sink (logit s for content tokens)
    alpha = math.sqrt(8.0 * s / rho**2)  # attention scale 1/8 = head_dim ** -0.5
    half = (KEY.stop - KEY.start) // 2
    for i, j in enumerate(KEY_PAIRS):
        for dim, source in ((j, i), (j + 32, half + i)):
            q[dim, source] = alpha
            k[dim, source] = alpha
    q[SINK_PAIR, SIGMA] = math.sqrt(8.0 * s)
    k[SINK_PAIR, ISCLS] = math.sqrt(8.0 * s)
    v[0, ISCLS] = 1.0
    # head 1: -sin(theta_j * (s - t)) * large towards [SEP]: ~1 after the first [SEP], ~0 before it
    angle = theta ** (-sep_pair / 32)
    product = 8.0 * zsep / math.sin(angle) / 16.0  # CONST = ISSEP = 4
    q[HEAD_DIM + sep_pair + 32, CONST] = -math.sqrt(product)
    k[HEAD_DIM + sep_pair, ISSEP] = math.sqrt(product)
    v[HEAD_DIM, ISSEP] = 0.25
    wo = layer.attn.Wo.weight  # (hidden, hidden): residual <- heads
    wo[:, : 2 * HEAD_DIM] = 0.0
    wo[[ASLOT, DSLOT], :] = 0.0
    wo[ASLOT, 0] = 1.0
    wo[DSLOT, HEAD_DIM] = 1.0


def _layer1(layer, hidden, zf):
    qkv = layer.attn.Wqkv.weight
    q, k, v = qkv[:hidden], qkv[hidden:2 * hidden], qkv[2 * hidden:]
    _zero_head(qkv, hidden, 0)
    # [CLS] attends to query tokens with logit log(idf) (documents' tokens: -12), averaging 1/2 - A
    gain = math.sqrt(8.0 * LOGW_SCALE)
    q[SINK_PAIR, ISCLS] = gain
    k[SINK_PAIR, LOGW] = gain
    k[SINK_PAIR, DSLOT] = -3.0 * gain
    v[0, CONTENT] = 1.0
    v[0, ASLOT] = -1.0
    wo = layer.attn.Wo.weight
    wo[:, :HEAD_DIM] = 0.0
    wo[FSLOT, :] = 0.0
    wo[FSLOT, 0] = zf
