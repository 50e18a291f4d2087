"""The references every exported path is judged against (docs/design.md, "Same scores: the numbers").

anchor      the packed model in float64 with the exact attention math, on the same pairs: what the
            model computes, up to fp64 rounding.
own error   a reference computed at the candidate's own precision, measured against that anchor in
            the same run: sentence-transformers' CrossEncoder in fp32 (its own padded path) for fp32
            candidates, the packed model in bf16 with flash attention (flash-attn, else PyTorch's
            varlen flash; never this project's kernel) for bf16 ones.

Because the anchor is the packed model itself, it is only a valid anchor if the packed model computes
what CrossEncoder computes on this checkpoint. `check_port` proves that with the same rule read the
other way: CrossEncoder fp32 must lie within the bound of the fp64 anchor that the packed model's own
fp32 error sets. A porting difference (a wrong window, RoPE theta, pooling index, missing bias) moves
CrossEncoder away from the anchor by far more than fp32 rounding moves either fp32 path; rounding at
depth or a wide score spread moves both alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ettin_runtime.errors import EttinError
from ettin_runtime.packing import PairEncoder, packed_batches

from ettin_export.model.attention import attention_backend, cuda_attention_implementation
from ettin_export.checkpoint import Checkpoint
from ettin_export.parity import BoundCheck, References, check_bound
from ettin_export.targets import FP32_BOUNDS

PORT_CHECK_PAIRS = 48  # the packed fp32 model's pass over a sample of the parity set
REFERENCE_BATCH_TOKENS = 16384
REFERENCE_BATCH_PAIRS = 256
CROSSENCODER_BATCH_SIZE = 16


class ReferenceMismatch(EttinError, ValueError):
    """The packed model does not compute what CrossEncoder computes on this checkpoint."""


def weights_fingerprint(checkpoint: Checkpoint) -> str:
    """sha256 over the checkpoint's tensors (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(checkpoint.state_dict):
        tensor = checkpoint.state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _where(device: str) -> str:
    return "CPU" if str(device) == "cpu" else torch.cuda.get_device_name(device)


@torch.no_grad()
def round_to_bf16(module: torch.nn.Module) -> torch.nn.Module:
    """Every floating-point parameter rounded to bf16 and kept in its own dtype (in place)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            parameter.copy_(parameter.to(torch.bfloat16).to(parameter.dtype))
    return module


@torch.inference_mode()
def packed_scores(model, encoder: PairEncoder, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """The packed model's scores in the caller's order, as float64 (an fp64 model keeps its digits)."""
    token_ids = encoder.encode(pairs)
    scores = np.empty(len(token_ids), dtype=np.float64)
    device = model.device
    for batch in packed_batches(token_ids, max(REFERENCE_BATCH_TOKENS, encoder.max_length), REFERENCE_BATCH_PAIRS):
        out = model(torch.from_numpy(batch.input_ids).to(device=device, dtype=torch.long),
                    torch.from_numpy(batch.cu_seqlens).to(device), batch.max_seqlen)
        scores[batch.order] = out.double().reshape(-1).cpu().numpy()
    return scores


def fp64_anchor(checkpoint: Checkpoint, pairs, encoder: PairEncoder, device: str = "cpu",
                *, bf16_weights: bool = False) -> tuple[np.ndarray, str]:
    model = checkpoint.build_model(torch.float64, device)
    if bf16_weights:
        round_to_bf16(model)
    with attention_backend("reference"):
        scores = packed_scores(model, encoder, pairs)
    del model
    rounded = ", bf16-rounded weights" if bf16_weights else ""
    return scores, f"packed PyTorch fp64 (exact attention, {_where(device)}{rounded})"


def packed_fp32(checkpoint: Checkpoint, pairs, encoder: PairEncoder, device: str = "cpu",
                *, model=None) -> tuple[np.ndarray, str]:
    model = model if model is not None else checkpoint.build_model(torch.float32, device)
    with attention_backend("reference"):
        scores = packed_scores(model, encoder, pairs)
    return scores, f"packed PyTorch fp32 (exact attention, {_where(device)})"


def crossencoder_fp32(checkpoint: Checkpoint, pairs, max_length: int, device: str = "cpu",
                      *, bf16_weights: bool = False) -> tuple[np.ndarray, str]:
    """sentence-transformers' CrossEncoder.predict in fp32 (its own padded path), raw scores."""
    from sentence_transformers import CrossEncoder

    from ettin_export.progress import quiet_third_party

    quiet_third_party()
    cross_encoder = CrossEncoder(str(checkpoint.path), activation_fn=torch.nn.Identity(), device=device,
                                 max_length=max_length)
    if bf16_weights:
        round_to_bf16(cross_encoder)
    # CrossEncoder.predict batches by length itself (sentence-transformers 6.3 sorts inside _inference)
    scores = cross_encoder.predict(list(pairs), batch_size=CROSSENCODER_BATCH_SIZE, show_progress_bar=False,
                                   convert_to_numpy=True)
    del cross_encoder
    rounded = ", bf16-rounded weights" if bf16_weights else ""
    return np.asarray(scores, dtype=np.float64), f"sentence-transformers CrossEncoder fp32 ({_where(device)}{rounded})"


def fp32_references(checkpoint: Checkpoint, pairs, encoder: PairEncoder, device: str = "cpu",
                    *, bf16_weights: bool = False, crossencoder: bool = True) -> References:
    """The fp64 anchor and CrossEncoder's own fp32 error on the same pairs: what fp32 candidates are
    judged against. Without `crossencoder` (build --skip-crossencoder-check) the own error is the
    packed model's in fp32, and the label says so."""
    anchor, anchor_name = fp64_anchor(checkpoint, pairs, encoder, device, bf16_weights=bf16_weights)
    if crossencoder:
        own, own_name = crossencoder_fp32(checkpoint, pairs, encoder.max_length, device, bf16_weights=bf16_weights)
    else:
        model = checkpoint.build_model(torch.float32, device)
        own, own_name = packed_fp32(checkpoint, pairs, encoder, device, model=round_to_bf16(model) if bf16_weights else model)
        own_name += " (CrossEncoder not run: --skip-crossencoder-check)"
    return References(anchor, anchor_name, own, own_name)


def bf16_flash(checkpoint: Checkpoint, pairs, encoder: PairEncoder, device: str = "cuda") -> tuple[np.ndarray, str]:
    """The reference's own bf16 error. On CUDA this is flash attention (flash-attn, else
    torch.nn.attention.varlen); on a CPU only the bf16 reference math exists, and the label says so."""
    model = checkpoint.build_model(torch.bfloat16, device)
    scores = packed_scores(model, encoder, pairs)
    del model
    if str(device) == "cpu":
        return scores, "packed PyTorch bf16 (CPU, reference attention: no flash kernel on a CPU)"
    return scores, f"packed PyTorch bf16 ({cuda_attention_implementation()}, {_where(device)})"


def bf16_references(checkpoint: Checkpoint, pairs, encoder: PairEncoder, device: str = "cuda",
                    anchor: tuple[np.ndarray, str] | None = None) -> References:
    """The fp64 anchor (cheap on a GPU; pass one already computed to reuse it) and the bf16 flash
    reference's own error: what bf16 candidates are judged against."""
    anchor_scores, anchor_name = anchor if anchor is not None else fp64_anchor(checkpoint, pairs, encoder, device)
    own, own_name = bf16_flash(checkpoint, pairs, encoder, device)
    return References(anchor_scores, anchor_name, own, own_name)


@dataclass(frozen=True)
class PortCheck:
    """The fp32 rule both ways on the same pairs against the fp64 anchor."""

    packed: BoundCheck  # the packed fp32 model, CrossEncoder fp32 as yardstick
    crossencoder: BoundCheck  # CrossEncoder fp32, the packed fp32 model as yardstick

    @property
    def passed(self) -> bool:
        return self.packed.passed and self.crossencoder.passed

    def describe(self) -> str:
        return (f"against the fp64 anchor: CrossEncoder fp32 {self.crossencoder.error:.3g} (bound "
                f"{self.crossencoder.rule}), packed fp32 {self.packed.error:.3g} (bound {self.packed.rule})")


def check_port(references: References, packed: np.ndarray) -> PortCheck:
    """The fp32 rule both ways on the same pairs: the packed fp32 model judged with CrossEncoder's
    fp32 error as yardstick (an fp32-only defect, e.g. positions that do not restart, shows here), and
    CrossEncoder judged with the packed fp32 model's error as yardstick (an anchor that is not what
    CrossEncoder computes shows here). Raises ReferenceMismatch when either fails."""
    swapped = References(references.anchor, references.anchor_name, packed, "packed PyTorch fp32")
    check = PortCheck(check_bound(packed, references, FP32_BOUNDS),
                      check_bound(references.own, swapped, FP32_BOUNDS))
    n = len(packed)
    if not check.crossencoder.passed:
        raise ReferenceMismatch(
            f"CrossEncoder's fp32 scores are {check.crossencoder.error:.3g} from the packed model's fp64 run on "
            f"{n} pairs, while the packed model's own fp32 scores are {check.packed.error:.3g} from it (bound "
            f"{check.crossencoder.rule}): the packed model does not compute what sentence-transformers computes on "
            "this checkpoint — a porting difference, not rounding. The checkpoint uses something ettin-export does "
            "not reproduce; nothing was exported. Please report it with the checkpoint's config.json."
        )
    if not check.packed.passed:
        raise ReferenceMismatch(
            f"the packed model's fp32 scores are {check.packed.error:.3g} from its own fp64 run on {n} pairs, "
            f"beyond {check.packed.rule} (2 x CrossEncoder's fp32 error {check.packed.own_error:.3g} + 1e-5): its "
            "fp32 arithmetic loses more than CrossEncoder's on this checkpoint. Nothing was exported; please "
            "report it with the checkpoint's config.json."
        )
    return check


def port_check_sample(pairs: Sequence[tuple[str, str]], count: int = PORT_CHECK_PAIRS) -> list[int]:
    """Indices of the longest pairs (truncated, across the local window) and a spread of the rest."""
    by_length = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    chosen = by_length[: count // 4] + by_length[count // 4 :: max(1, len(pairs) // count)][: count - count // 4]
    return chosen


def check_port_on_sample(checkpoint: Checkpoint, pairs, references: References, encoder: PairEncoder,
                         device: str = "cpu", *, model=None) -> PortCheck:
    """`check_port` on a sample of `pairs` (whose fp64 anchor and CrossEncoder scores `references`
    already holds): the packed fp32 model (`model` if given, on the CPU) runs on the sample only."""
    sample = port_check_sample(pairs)
    packed, _ = packed_fp32(checkpoint, [pairs[i] for i in sample], encoder, device, model=model)
    return check_port(references.subset(sample), packed)
