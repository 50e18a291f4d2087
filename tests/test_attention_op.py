"""The op `ettin::varlen_attention`: CPU reference against a plain masked softmax, shapes, export."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from ettin_export.model.attention import _length_buckets, reference_varlen_attention


def naive_attention(q, k, v, cu_seqlens, window):
    """One pair at a time, a full [L, L] score matrix with an explicit |i-j| <= window mask, in fp64."""
    out = torch.empty_like(q, dtype=torch.float64)
    for b in range(len(cu_seqlens) - 1):
        s, e = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        qb, kb, vb = (x[s:e].double().transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        scores = qb @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1])
        i = torch.arange(e - s)
        if window >= 0:
            scores = scores.masked_fill((i[:, None] - i[None, :]).abs() > window, float("-inf"))
        out[s:e] = (torch.softmax(scores, dim=-1) @ vb).transpose(0, 1)
    return out


def packed_inputs(lengths, heads=3, dim=64, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    # Scaled so the softmax is peaked, as in a trained model.
    q, k, v = (torch.randn(total, heads, dim, generator=generator) * 1.5 for _ in range(3))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return q.to(dtype), k.to(dtype), v.to(dtype), cu


CASES = {
    "one-pair-1": [1],
    "one-pair-513": [513],
    "awkward": [1, 63, 64, 65, 129, 513, 2, 127, 128],
    "many-short-beside-one-long": [3] * 40 + [700] + [1, 2, 5] * 10,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [-1, 0, 1, 3, 16, 64])
def test_reference_matches_plain_masked_softmax(case, window):
    q, k, v, cu = packed_inputs(CASES[case], seed=zlib.crc32(f"{case}{window}".encode()))
    got = reference_varlen_attention(q, k, v, cu, window)
    expected = naive_attention(q, k, v, cu, window)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.max(torch.abs(got.double() - expected)).item() < 2e-5


def test_window_is_inclusive_half_width():
    """With window w, token i sees i-w..i+w: changing v at distance w+1 must not change token i,
    changing it at distance w must."""
    q, k, v, cu = packed_inputs([40], heads=1, seed=3)
    base = reference_varlen_attention(q, k, v, cu, 8)
    far, near = v.clone(), v.clone()
    far[20 + 9] += 10.0
    near[20 + 8] += 10.0
    assert torch.equal(reference_varlen_attention(q, k, far, cu, 8)[20], base[20])
    assert not torch.allclose(reference_varlen_attention(q, k, near, cu, 8)[20], base[20])


def test_pairs_do_not_see_each_other():
    q, k, v, cu = packed_inputs([30, 30], heads=2, seed=4)
    base = reference_varlen_attention(q, k, v, cu, -1)
    changed = v.clone()
    changed[30:] += 5.0
    out = reference_varlen_attention(q, k, changed, cu, -1)
    assert torch.equal(out[:30], base[:30])
    assert not torch.allclose(out[30:], base[30:])


def test_bf16_inputs_give_bf16_outputs_close_to_fp32():
    q, k, v, cu = packed_inputs([65, 7, 129], seed=5)
    out = reference_varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, 64)
    assert out.dtype == torch.bfloat16
    assert torch.max(torch.abs(out.float() - reference_varlen_attention(q, k, v, cu, 64))).item() < 0.1


def test_reference_work_is_bounded_by_pair_lengths():
    """Padding inside a length bucket at most doubles a pair: work <= 4 * sum(L^2), never T^2."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.randint(1, 10, (300,), generator=generator), torch.tensor([1500, 700, 65])])
    work = sum(len(m) * int(lengths[m].max()) ** 2 for m in _length_buckets(lengths))
    assert work <= 4 * int((lengths**2).sum())
    assert work < int(lengths.sum()) ** 2 / 2


def test_op_is_registered_with_a_fake_for_export():
    torch.library.opcheck(
        torch.ops.ettin.varlen_attention.default,
        (*packed_inputs([5, 9], heads=2)[:4], 9, 3),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_op_exports_as_one_node_with_dynamic_tokens():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v, cu):
            return torch.ops.ettin.varlen_attention(q, k, v, cu, q.shape[0], 64)

    q, k, v, cu = packed_inputs([5, 9, 12], heads=2)
    tokens = torch.export.Dim("tokens", min=2)
    pairs_plus_one = torch.export.Dim("pairs_plus_one", min=2)
    exported = torch.export.export(
        Attend(), (q, k, v, cu),
        dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}, {0: pairs_plus_one}),
    )
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.ettin.varlen_attention.default) == 1
    q2, k2, v2, cu2 = packed_inputs([100, 3], heads=2, seed=9)
    assert torch.allclose(exported.module()(q2, k2, v2, cu2), reference_varlen_attention(q2, k2, v2, cu2, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the CUDA path runs in scripts/gpu_check.py")
def test_cuda_path_matches_reference():
    q, k, v, cu = packed_inputs([1, 63, 64, 65, 129, 513], seed=7)
    for window in (-1, 64):
        expected = reference_varlen_attention(q, k, v, cu, window)
        got = torch.ops.ettin.varlen_attention(
            q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(), cu.cuda(), 513, window
        )
        assert torch.max(torch.abs(got.float().cpu() - expected)).item() < 0.05
