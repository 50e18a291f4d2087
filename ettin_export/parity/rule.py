"""docs/design.md, "Same scores", applied: the metrics, the one error bound (`check_bound`), the verdict
(`judge`) and the report every command prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ettin_export.targets import Target


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
    tie_bits: int | None = None  # top-1 / top-10 judged up to ties within one ulp at these bits (None: strict)

    @classmethod
    def compute(cls, reference: np.ndarray, candidate: np.ndarray, spans: Sequence[slice],
                tie_bits: int | None = None) -> ParityMetrics:
        """The candidate against the reference. With `tie_bits`, a query's top-1 agrees when the candidate's
        pick scores within one ulp (at that many significant bits of the query's largest |reference score|)
        of the reference's best, and a candidate top-10 document counts when it scores within that ulp of the
        reference's 10th best: an order the precision cannot resolve is not held against it."""
        reference = np.asarray(reference, dtype=np.float64)
        candidate = np.asarray(candidate, dtype=np.float64)
        diff = np.abs(reference - candidate)
        top1, overlap = [], []
        for span in spans:
            ref, cand = reference[span], candidate[span]
            if not len(ref):
                continue
            tie = _ulp(np.abs(ref).max(), tie_bits)
            top1.append(bool(ref[int(np.argmax(cand))] >= ref.max() - tie))
            k = min(10, len(ref))
            cand_top = np.argsort(-cand, kind="stable")[:k]
            if tie_bits is None:
                ref_top = set(np.argsort(-ref, kind="stable")[:k].tolist())
                overlap.append(len(ref_top & set(cand_top.tolist())) / k)
            else:  # within one ulp of the reference's k-th best counts
                overlap.append(float(np.mean(ref[cand_top] >= np.sort(ref)[-k] - tie)))
        return cls(
            pairs=len(reference), queries=len(spans),
            max_abs_diff=float(diff.max()) if len(diff) else 0.0,
            mean_abs_diff=float(diff.mean()) if len(diff) else 0.0,
            spearman=spearman(reference, candidate) if len(reference) > 1 else 1.0,
            top1_agreement=float(np.mean(top1)) if top1 else 1.0,
            top10_overlap=float(np.mean(overlap)) if overlap else 1.0, tie_bits=tie_bits,
        )


def _ulp(magnitude: float, bits: int | None) -> float:
    """One unit in the last place of `magnitude` at `bits` significant bits (bf16: 8); 0 when strict."""
    if bits is None or not magnitude > 0:
        return 0.0
    return float(2.0 ** (np.floor(np.log2(magnitude)) - (bits - 1)))


@dataclass(frozen=True)
class References:
    """What a candidate's scores are judged against, on the same pairs in the same order.

    anchor: the packed model in float64 (the exact function, up to fp64 rounding).
    own: a reference computed at the candidate's own precision (CrossEncoder fp32 for an fp32
        candidate, the packed model in bf16 with flash attention for a bf16 one): its distance to the
        anchor is what rounding alone does to this checkpoint, and the bound scales with it."""

    anchor: np.ndarray
    anchor_name: str
    own: np.ndarray
    own_name: str

    def subset(self, index) -> References:
        index = np.asarray(index)
        return References(self.anchor[index], self.anchor_name, self.own[index], self.own_name)


def _max_abs(a, b) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff.max()) if diff.size else 0.0


@dataclass(frozen=True)
class BoundCheck:
    """The error bound of docs/design.md ("Same scores") applied once: max |candidate - anchor| against
    error_ratio x max |own - anchor| + error_slack, on the same pairs."""

    error: float  # max |candidate - anchor|
    own_error: float  # max |own reference - anchor|
    versus_own: float  # max |candidate - own reference|: the old absolute figure, for information
    limit: float
    rule: str  # e.g. "2 x 6.05e-05 + 1e-05 = 0.000131"

    @property
    def passed(self) -> bool:
        return self.error <= self.limit

    def describe(self) -> str:
        return (f"candidate vs anchor {self.error:.3g} (bound {self.rule}), own reference vs anchor "
                f"{self.own_error:.3g}, candidate vs own reference {self.versus_own:.3g}")


def check_bound(candidate, references: References, bounds) -> BoundCheck:
    """`bounds` is a targets.ScoreBounds (FP32_BOUNDS for fp32 candidates)."""
    if len(candidate) != len(references.anchor):
        raise ValueError(f"{len(candidate)} candidate scores for {len(references.anchor)} reference scores.")
    own_error = _max_abs(references.own, references.anchor)
    return BoundCheck(_max_abs(candidate, references.anchor), own_error, _max_abs(candidate, references.own),
                      bounds.limit(own_error), bounds.describe(own_error))


@dataclass
class ParityReport:
    """What `build` stores in parity.json and `verify` prints: the candidate against the anchor
    (fp64), the reference's own error at the candidate's precision against the same anchor, and the
    candidate against that reference (for information: the old absolute figure)."""

    target: str
    precision: str
    candidate: str  # e.g. "onnxruntime fp32 (CPU)", "tensorrt bf16 (H100)"
    reference: str  # the anchor, e.g. "packed PyTorch fp64 (CPU, exact attention)"
    metrics: ParityMetrics  # candidate vs anchor
    reference_lowp: str | None = None  # the own reference, e.g. "sentence-transformers CrossEncoder fp32"
    reference_lowp_metrics: ParityMetrics | None = None  # own reference vs anchor
    candidate_vs_reference_lowp: ParityMetrics | None = None  # candidate vs own reference
    anchor_precision: str = "fp64"
    bounds: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # CPU targets: the machine the gate ran on and the precision its runtime computed in
    # (ettin_export.build.cpu.record_machine); None where not recorded.
    judged_on: dict | None = None

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
            "anchor_precision": self.anchor_precision,
            "pairs": m.pairs, "queries": m.queries, "max_abs_diff": m.max_abs_diff,
            "mean_abs_diff": m.mean_abs_diff, "spearman": m.spearman,
            "top1_agreement": m.top1_agreement, "top10_overlap": m.top10_overlap,
            "max_abs_bound": self.bounds.get("max_abs_diff"),
        }
        if self.judged_on is not None:
            out["judged_on"] = self.judged_on
        if self.reference_lowp_metrics is not None:
            out["reference_lowp"] = self.reference_lowp
            out["reference_lowp_max_abs_diff"] = self.reference_lowp_metrics.max_abs_diff
        if self.candidate_vs_reference_lowp is not None:
            out["candidate_vs_reference_lowp_max_abs_diff"] = self.candidate_vs_reference_lowp.max_abs_diff
        return out


def score_scale(candidate, anchor) -> float:
    """The slope of the least-squares fit candidate ~ anchor (1 for the same scale)."""
    anchor = np.asarray(anchor, np.float64)
    centered = anchor - anchor.mean()
    variance = float(centered @ centered)
    return float(centered @ (np.asarray(candidate, np.float64) - np.mean(candidate)) / variance) if variance else 1.0


def judge(
    target: Target,
    candidate_name: str,
    candidate: np.ndarray,
    references: References,
    spans: Sequence[slice],
    anchor_precision: str = "fp64",
    *,
    precision: str | None = None,
) -> ParityReport:
    """Apply the bounds of the target at the candidate's precision (docs/design.md, "Same scores: the numbers"): max |candidate - anchor|
    within error_ratio x the own reference's error + slack (where the precision has an error bound),
    the score scale (where it has one), and the ranking bounds against the anchor."""
    precision = precision or target.precision
    bounds = target.bounds_for(precision)
    metrics = ParityMetrics.compute(references.anchor, candidate, spans, bounds.tie_bits)
    own = ParityMetrics.compute(references.anchor, references.own, spans, bounds.tie_bits)
    versus_own = ParityMetrics.compute(references.own, candidate, spans, bounds.tie_bits)
    check = check_bound(candidate, references, bounds)
    failures = []
    if not check.passed:
        failures.append(
            f"max |Δscore| vs the {anchor_precision} anchor {check.error:.3g} > {check.rule} "
            f"({bounds.error_ratio:g} x the own error of {references.own_name}"
            f"{f' + {bounds.error_slack:g}' if bounds.error_slack else ''})"
        )
    limits = {"max_abs_diff": check.limit if bounds.error_ratio is not None else None,
              "error_ratio": bounds.error_ratio, "error_slack": bounds.error_slack, "tie_bits": bounds.tie_bits}
    fixed, ranks = bounds.rank_bounds(), bounds.rank_bounds(own)
    if bounds.rank_ratio is not None:
        limits.update(rank_ratio=bounds.rank_ratio, rank_fixed=fixed,
                      rank_floor=dict(zip(fixed, bounds.rank_floor)))
    for (name, bound), floor in zip(ranks.items(), bounds.rank_floor):
        limits[name] = bound
        value = getattr(metrics, name)
        if not value >= bound - 1e-12:  # a relative bound of 1 - 1.5 x (8 of 300) must admit 12 of 300
            failures.append(f"{name} {value:.4f} < {bound:.6g}" + _rank_reason(name, bound, fixed[name], floor, own,
                                                                               bounds, references.own_name))
    if bounds.max_scale_error is not None:
        scale = score_scale(candidate, references.anchor)
        limits.update(max_scale_error=bounds.max_scale_error, score_scale=scale)
        if not abs(scale - 1.0) <= bounds.max_scale_error:
            failures.append(
                f"score scale {scale:.4f} (least-squares slope of the candidate on the anchor) is more than "
                f"{bounds.max_scale_error:.0%} from 1: a uniform rescaling keeps every rank, so a wrong head or output "
                "scale shows only here"
            )
    return ParityReport(
        target=target.name, precision=precision, candidate=candidate_name,
        reference=references.anchor_name, metrics=metrics, reference_lowp=references.own_name,
        reference_lowp_metrics=own, candidate_vs_reference_lowp=versus_own, anchor_precision=anchor_precision,
        bounds=limits, failures=failures,
    )


def _rank_reason(name, bound, fixed, floor, own, bounds, own_name) -> str:
    """Why a rank bound is where it is, where it is not the fixed one."""
    if bound == fixed:
        return ""
    own_value = getattr(own, name)
    if bound == min(floor, fixed):
        return (f", the floor: the own reference ({own_name}) has {name} {own_value:.4f} against the anchor itself, "
                "so bf16 rounding alone costs this checkpoint more ranking agreement than a bf16 build may lose; "
                "build it in fp32 (or int8 on a CPU)")
    return (f" ({bounds.rank_ratio:g} x what the own reference loses: its {name} {own_value:.4f} against the anchor; "
            f"fixed bound {fixed:g})")


def format_report(report: ParityReport) -> str:
    m = report.metrics
    lines = [
        f"parity: {report.candidate}  ({m.pairs} pairs, {m.queries} queries)",
        f"  anchor: {report.reference}",
        f"  candidate vs anchor:         max |Δ| {m.max_abs_diff:.3g}   mean |Δ| {m.mean_abs_diff:.3g}   "
        f"Spearman {m.spearman:.6f}   top-1 {m.top1_agreement:.1%}   top-10 overlap {m.top10_overlap:.3f}",
    ]
    if report.reference_lowp_metrics is not None:
        r = report.reference_lowp_metrics
        lines.append(f"  own reference vs anchor:     max |Δ| {r.max_abs_diff:.3g}   mean |Δ| {r.mean_abs_diff:.3g}   "
                     f"Spearman {r.spearman:.6f}   top-1 {r.top1_agreement:.1%}   top-10 overlap {r.top10_overlap:.3f}   "
                     f"({report.reference_lowp}: what rounding alone does)")
    if report.candidate_vs_reference_lowp is not None:
        c = report.candidate_vs_reference_lowp
        lines.append(f"  candidate vs own reference:  max |Δ| {c.max_abs_diff:.3g}   mean |Δ| {c.mean_abs_diff:.3g}   "
                     "(for information)")
    b = report.bounds
    if b.get("error_ratio") is None:
        rule = "max |Δ| reported only"
    else:
        rule = f"max |Δ| ≤ {b['error_ratio']:g} x own error" + (f" + {b['error_slack']:g}" if b.get("error_slack") else "")
        rule += f" = {b['max_abs_diff']:.3g}"
    scale = (f", score scale {b['score_scale']:.4f} within 1 ± {b['max_scale_error']:g}"
             if b.get("max_scale_error") is not None else "")
    ties = (f" (top-1 / top-10 up to ties within one ulp at {b['tie_bits']} bits of the query's top score)"
            if b.get("tie_bits") else "")
    relative = ""
    if b.get("rank_ratio") is not None:
        fixed = b["rank_fixed"]
        relative = (f"; rank bounds: the fixed ones (Spearman {fixed['spearman']:g}, top-1 {fixed['top1_agreement']:g}, "
                    f"top-10 {fixed['top10_overlap']:g}) or {b['rank_ratio']:g} x the own reference's disagreement, "
                    "whichever is looser, down to a floor")
    lines.append(
        f"  bounds: {rule}, Spearman ≥ {b['spearman']:.6g}, top-1 ≥ {b['top1_agreement']:.6g}, "
        f"top-10 overlap ≥ {b['top10_overlap']:.6g}{scale}{ties}{relative}"
    )
    if report.judged_on:
        j = report.judged_on
        lines.append(f"  judged on: {j['cpu']} ({' '.join(j['features']) or 'features unknown'}; class {j['class']}), "
                     f"computed in {j['precision_computed']}")
    lines.append("  PASSED" if report.passed else "  FAILED: " + "; ".join(report.failures))
    return "\n".join(lines)
