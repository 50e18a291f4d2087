"""The packed ModernBERT reranker: the whole model on unpadded tokens, in one nn.Module.

This single definition is the ONNX export source, the PyTorch runtime and the GPU reference. Module
and parameter names follow transformers' ModernBertModel, so a backbone state dict loads as is.

Inputs:  input_ids int [T], cu_seqlens int32 [B+1] (positions are derived from cu_seqlens)
Output:  scores float32 [B, 1] (raw logits)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ettin_export.model import attention  # noqa: F401  (registers torch.ops.ettin.varlen_attention)

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(approximate="none"),
    "gelu_python": lambda: nn.GELU(approximate="none"),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}.")
    return _ACTIVATIONS[name]()


@dataclass(frozen=True)
class HeadConfig:
    """pooled -> dense -> activation -> LayerNorm -> classifier(1). Covers the sentence-transformers
    chain (Dense(GELU, no bias) -> LayerNorm(bias) -> Dense) and HF's ModernBertPredictionHead +
    classifier alike."""

    dense_bias: bool = False
    activation: str = "gelu"
    norm_bias: bool = True
    norm_eps: float = 1e-5
    pooling: str = "cls"  # "cls" | "mean"


@dataclass(frozen=True)
class PackedConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    windows: tuple[int, ...]  # per layer: inclusive half-width, -1 for global layers
    global_rope_theta: float
    local_rope_theta: float
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_activation: str = "gelu"
    pad_token_id: int | None = None
    head: HeadConfig = field(default_factory=HeadConfig)
    max_positions: int | None = None  # max_position_embeddings: the longest pair CrossEncoder would take

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PackedConfig:
        data = dict(data)
        data["windows"] = tuple(data["windows"])
        data["head"] = HeadConfig(**data.get("head", {}))
        return cls(**data)

    @classmethod
    def from_modernbert(cls, config, head: HeadConfig) -> PackedConfig:
        """From a transformers ModernBertConfig (v4 or v5 layout; parsed by transformers itself)."""
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}."
            )
        rope = config.rope_parameters
        for kind in ("full_attention", "sliding_attention"):
            rope_type = (rope.get(kind) or {}).get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"Unsupported rotary type {rope_type!r} for {kind} layers (only 'default').")
        half_window = config.local_attention // 2
        windows = tuple(half_window if t == "sliding_attention" else -1 for t in config.layer_types)
        same_names = ("vocab_size", "hidden_size", "intermediate_size", "norm_eps", "norm_bias", "attention_bias",
                      "mlp_bias", "hidden_activation", "pad_token_id")
        return cls(
            **{name: getattr(config, name) for name in same_names},
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            windows=windows,
            global_rope_theta=float(rope["full_attention"]["rope_theta"]),
            local_rope_theta=float(rope["sliding_attention"]["rope_theta"]),
            head=head,
            max_positions=getattr(config, "max_position_embeddings", None),
        )


def modernbert_config(hf_config: dict):
    """transformers' ModernBertConfig of a config.json dict (its bookkeeping keys dropped)."""
    from transformers import ModernBertConfig

    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version")}
    return ModernBertConfig(**fields)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each token inside its own pair (restarting at 0), from cu_seqlens alone.

    Written with scatter + cumsum + gather so it exports to plain ONNX (no data-dependent shapes)."""
    cu = cu_seqlens.long()
    starts_after_first = cu[1:-1]
    marks = torch.zeros(total, dtype=torch.long, device=cu.device)
    marks = marks.scatter(0, starts_after_first, torch.ones_like(starts_after_first))
    pair_of_token = torch.cumsum(marks, dim=0)
    return torch.arange(total, device=cu.device) - cu[pair_of_token]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 are upcast, fp64 (a high-precision reference) is kept."""
    return x if x.dtype == torch.float64 else x.float()


class Rotary(nn.Module):
    """NeoX-style rotary embedding, angles in fp32 (fp64 for an fp64 model) from integer positions.

    The inverse frequencies are computed in forward, not stored as a buffer: `model.to(bfloat16)`
    would round a buffer to bf16 and shift every angle by up to ~0.4% of the position."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=dtype, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = positions.to(dtype)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]  # [T, 1, D]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = _wide(x)
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics and affine transform run in fp32 whatever the activations' dtype,
    then cast back: what PyTorch's bf16 kernels do internally, made explicit so the exported bf16
    graph keeps LayerNorm in fp32 (Cast -> LayerNormalization -> Cast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else _wide(self.weight)
        bias = None if self.bias is None else _wide(self.bias)
        return F.layer_norm(_wide(x), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Embeddings(nn.Module):
    def __init__(self, config: PackedConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class Attention(nn.Module):
    def __init__(self, config: PackedConfig, window: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.window = window
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, hidden, cos, sin, cu_seqlens, max_seqlen: int):
        total = hidden.shape[0]
        q, k, v = self.Wqkv(hidden).view(total, 3, self.num_heads, self.head_dim).unbind(dim=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = torch.ops.ettin.varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.window)
        return self.Wo(out.reshape(total, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """GeGLU: Wi projects to 2 x intermediate, act(first half) * second half, then Wo."""

    def __init__(self, config: PackedConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = make_activation(config.hidden_activation)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate_input, gate = self.Wi(hidden).chunk(2, dim=-1)
        return self.Wo(self.act(gate_input) * gate)


class EncoderLayer(nn.Module):
    def __init__(self, config: PackedConfig, index: int):
        super().__init__()
        # ModernBERT skips the attention pre-norm of layer 0 (the embedding norm precedes it).
        self.attn_norm = (
            nn.Identity()
            if index == 0
            else LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        )
        self.attn = Attention(config, config.windows[index])
        self.mlp_norm = LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.mlp = MLP(config)
        self.is_global = config.windows[index] < 0

    def forward(self, hidden, cos, sin, cu_seqlens, max_seqlen: int):
        hidden = hidden + self.attn(self.attn_norm(hidden), cos, sin, cu_seqlens, max_seqlen)
        return hidden + self.mlp(self.mlp_norm(hidden))


class Head(nn.Module):
    def __init__(self, config: PackedConfig):
        super().__init__()
        h = config.hidden_size
        self.dense = nn.Linear(h, h, bias=config.head.dense_bias)
        self.act = make_activation(config.head.activation)
        self.norm = LayerNorm(h, eps=config.head.norm_eps, bias=config.head.norm_bias)
        self.classifier = nn.Linear(h, 1, bias=True)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        features = self.norm(self.act(self.dense(pooled)))
        # The score itself is always computed in fp32, whatever the model's precision.
        bias = None if self.classifier.bias is None else _wide(self.classifier.bias)
        return F.linear(_wide(features), _wide(self.classifier.weight), bias)


class PackedReranker(nn.Module):
    """ModernBERT cross-encoder on packed tokens: embeddings, every layer, final norm, pooling, head."""

    def __init__(self, config: PackedConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_layers))
        self.final_norm = LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.global_rotary = Rotary(config.head_dim, config.global_rope_theta)
        self.local_rotary = Rotary(config.head_dim, config.local_rope_theta)
        self.head = Head(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.tok_embeddings.weight.device

    def forward(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None
    ) -> torch.Tensor:
        total = input_ids.shape[0]
        if max_seqlen is None:  # one host sync per forward, shared by every layer
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu_seqlens = cu_seqlens.to(torch.int32)
        positions = positions_from_cu_seqlens(cu_seqlens, total)
        angle_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        rotary = {True: self.global_rotary(positions, angle_dtype), False: self.local_rotary(positions, angle_dtype)}
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            cos, sin = rotary[layer.is_global]
            hidden = layer(hidden, cos, sin, cu_seqlens, max_seqlen)
        hidden = self.final_norm(hidden)
        return self.head(self.pool(hidden, cu_seqlens))

    def pool(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        cu = cu_seqlens.long()
        if self.config.head.pooling == "cls":
            return hidden[cu[:-1]]
        # Mean per pair as a [B, T] membership matmul: exact sums in fp32, exportable, no scatter-add.
        total = hidden.shape[0]
        token = torch.arange(total, device=hidden.device)
        wide = _wide(hidden)
        members = ((token[None, :] >= cu[:-1, None]) & (token[None, :] < cu[1:, None])).to(wide.dtype)
        sums = members @ wide
        return (sums / (cu[1:] - cu[:-1]).to(wide.dtype)[:, None]).to(hidden.dtype)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_changes(config: PackedConfig, **changes) -> PackedConfig:
    """A copy of a config with some fields replaced (used by tests that inject deliberate mistakes)."""
    return replace(config, **changes)


def init_random_weights(model: PackedReranker, seed: int = 0) -> None:
    """Random weights that behave like a trained reranker numerically: peaked attention (q.k/sqrt(D)
    logits with a standard deviation of ~1.5: the top key gets ~10-20x the uniform weight) and non-trivial norm scales and biases, so
    parity checks exercise every parameter. The score scale is calibrated separately."""
    generator = torch.Generator().manual_seed(seed)
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size

    def normal(tensor: torch.Tensor, std: float, mean: float = 0.0) -> None:
        with torch.no_grad():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + mean)

    normal(model.embeddings.tok_embeddings.weight, 1.0)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            normal(module.weight, 0.1, mean=1.0)
            if module.bias is not None:
                normal(module.bias, 0.3)
    qk_std = math.sqrt(1.5 / h)  # each q, k entry ~ N(0, 1.5) => q.k / sqrt(D) ~ N(0, 1.5^2)
    for layer in model.layers:
        wqkv = layer.attn.Wqkv.weight
        normal(wqkv[: 2 * h], qk_std)
        normal(wqkv[2 * h :], 1.0 / math.sqrt(h))
        normal(layer.attn.Wo.weight, 1.0 / math.sqrt(h))
        normal(layer.mlp.Wi.weight, 1.0 / math.sqrt(h))
        normal(layer.mlp.Wo.weight, 1.0 / math.sqrt(i))
        for linear in (layer.attn.Wqkv, layer.attn.Wo, layer.mlp.Wi, layer.mlp.Wo):
            if linear.bias is not None:
                normal(linear.bias, 0.1)
    normal(model.head.dense.weight, 1.0 / math.sqrt(h))
    if model.head.dense.bias is not None:
        normal(model.head.dense.bias, 0.1)
    normal(model.head.classifier.weight, 1.0 / math.sqrt(h))
    normal(model.head.classifier.bias, 0.1)
