"""Parity: the built-in parity set, the metrics, and the verdict against DESIGN.md's bounds.

A parity set is a list of queries, each with 30-100 candidate documents, so ranking metrics (top-1
agreement, top-10 overlap) mean something beside the score differences.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .pairs import random_sentence, read_pairs_jsonl
from .targets import Target

Group = tuple[str, list[str]]  # (query, candidate documents)


def builtin_parity_set(seed: int = 0, queries: int = 10) -> list[Group]:
    """Queries of 3-20 words with 30-100 candidates each; documents mostly 20-200 words (NQ-like
    passages), some beyond 512 tokens (truncated), a few empty or one word."""
    rng = random.Random(seed)
    groups = []
    for _ in range(queries):
        query = random_sentence(rng, rng.randint(3, 20)) + "?"
        documents = []
        for _ in range(rng.randint(30, 100)):
            roll = rng.random()
            if roll < 0.03:
                documents.append(rng.choice(["", "yes", random_sentence(rng, 1)]))
            elif roll < 0.10:
                documents.append(random_sentence(rng, rng.randint(450, 700)))
            else:
                documents.append(random_sentence(rng, rng.randint(20, 200)) + ".")
        groups.append((query, documents))
    return groups


def read_parity_file(path: str | Path) -> list[Group]:
    """JSON lines {"query", "document"}; documents are grouped by their query, in file order."""
    groups: dict[str, list[str]] = {}
    for query, document in read_pairs_jsonl(path):
        groups.setdefault(query, []).append(document)
    return list(groups.items())


def flatten(groups: Sequence[Group]) -> tuple[list[tuple[str, str]], list[slice]]:
    pairs, spans = [], []
    for query, documents in groups:
        spans.append(slice(len(pairs), len(pairs) + len(documents)))
        pairs.extend((query, d) for d in documents)
    return pairs, spans


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties (no scipy needed)."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 1.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


@dataclass
class ParityMetrics:
    pairs: int
    queries: int
    max_abs_diff: float
    mean_abs_diff: float
    spearman: float
    top1_agreement: float
    top10_overlap: float

    @classmethod
    def compute(cls, reference: np.ndarray, candidate: np.ndarray, spans: Sequence[slice]) -> ParityMetrics:
        reference = np.asarray(reference, dtype=np.float64)
        candidate = np.asarray(candidate, dtype=np.float64)
        diff = np.abs(reference - candidate)
        top1, overlap = [], []
        for span in spans:
            ref, cand = reference[span], candidate[span]
            top1.append(int(np.argmax(ref)) == int(np.argmax(cand)))
            k = min(10, len(ref))
            ref_top = set(np.argsort(-ref, kind="stable")[:k].tolist())
            cand_top = set(np.argsort(-cand, kind="stable")[:k].tolist())
            overlap.append(len(ref_top & cand_top) / k)
        return cls(
            pairs=len(reference), queries=len(spans),
            max_abs_diff=float(diff.max()) if len(diff) else 0.0,
            mean_abs_diff=float(diff.mean()) if len(diff) else 0.0,
            spearman=spearman(reference, candidate) if len(reference) > 1 else 1.0,
            top1_agreement=float(np.mean(top1)) if top1 else 1.0,
            top10_overlap=float(np.mean(overlap)) if overlap else 1.0,
        )


@dataclass
class ParityReport:
    """What `build` stores in parity.json and `verify` prints: the exported path against the fp32
    reference, beside the reference's own low-precision error when the target is bf16."""

    target: str
    precision: str
    candidate: str  # e.g. "onnxruntime fp32", "tensorrt bf16"
    reference: str  # e.g. "packed PyTorch fp32 (CPU reference attention)"
    metrics: ParityMetrics
    reference_lowp: str | None = None  # e.g. "packed PyTorch bf16 (flash attention)"
    reference_lowp_metrics: ParityMetrics | None = None
    bounds: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def summary(self) -> dict:
        """The short form kept in manifest.json."""
        m = self.metrics
        out = {
            "passed": self.passed, "candidate": self.candidate, "reference": self.reference,
            "pairs": m.pairs, "queries": m.queries, "max_abs_diff": m.max_abs_diff,
            "mean_abs_diff": m.mean_abs_diff, "spearman": m.spearman,
            "top1_agreement": m.top1_agreement, "top10_overlap": m.top10_overlap,
        }
        if self.reference_lowp_metrics is not None:
            out["reference_lowp_max_abs_diff"] = self.reference_lowp_metrics.max_abs_diff
        return out


def judge(
    target: Target,
    candidate_name: str,
    reference_name: str,
    metrics: ParityMetrics,
    reference_lowp_name: str | None = None,
    reference_lowp: ParityMetrics | None = None,
) -> ParityReport:
    """Apply the target's bounds. fp32: an absolute bound. bf16: relative to the reference's own
    bf16 error (flash-attention's convention), plus ranking bounds."""
    failures, bounds = [], {}
    if target.max_abs_bound is not None:
        bounds["max_abs_diff"] = target.max_abs_bound
        if not metrics.max_abs_diff <= target.max_abs_bound:
            failures.append(f"max |Δscore| {metrics.max_abs_diff:.3g} > {target.max_abs_bound:g}")
    if target.bf16_error_ratio is not None:
        if reference_lowp is None:
            failures.append("no low-precision reference was measured, so the bf16 bound cannot be applied")
        else:
            limit = target.bf16_error_ratio * reference_lowp.max_abs_diff
            bounds["max_abs_diff"] = limit
            if not metrics.max_abs_diff <= limit:
                failures.append(
                    f"max |Δscore| {metrics.max_abs_diff:.3g} > {target.bf16_error_ratio:g} x the reference's own "
                    f"bf16 error {reference_lowp.max_abs_diff:.3g}"
                )
    for name, bound in (("spearman", target.min_spearman), ("top1_agreement", target.min_top1_agreement),
                        ("top10_overlap", target.min_top10_overlap)):
        bounds[name] = bound
        value = getattr(metrics, name)
        if not value >= bound:
            failures.append(f"{name} {value:.4f} < {bound:g}")
    return ParityReport(
        target=target.name, precision=target.precision, candidate=candidate_name, reference=reference_name,
        metrics=metrics, reference_lowp=reference_lowp_name, reference_lowp_metrics=reference_lowp,
        bounds=bounds, failures=failures,
    )


def format_report(report: ParityReport) -> str:
    m = report.metrics
    lines = [
        f"parity: {report.candidate} vs {report.reference}  ({m.pairs} pairs, {m.queries} queries)",
        f"  max |Δ| {m.max_abs_diff:.3g}   mean |Δ| {m.mean_abs_diff:.3g}   Spearman {m.spearman:.6f}   "
        f"top-1 {m.top1_agreement:.1%}   top-10 overlap {m.top10_overlap:.3f}",
    ]
    if report.reference_lowp_metrics is not None:
        r = report.reference_lowp_metrics
        lines.append(
            f"  reference's own error ({report.reference_lowp}): max |Δ| {r.max_abs_diff:.3g}   "
            f"mean |Δ| {r.mean_abs_diff:.3g}   Spearman {r.spearman:.6f}"
        )
    bounds = ", ".join(f"{k} {'≤' if k.startswith('max') else '≥'} {v:.3g}" for k, v in report.bounds.items())
    lines.append(f"  bounds: {bounds}")
    lines.append("  PASSED" if report.passed else "  FAILED: " + "; ".join(report.failures))
    return "\n".join(lines)
