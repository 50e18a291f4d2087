"""The tests' side of the fp32 rule (docs/design.md, "Same scores"): references made by the product's one implementation
(ettin_export.reference.fp32_references: the packed model in fp64 as anchor, CrossEncoder fp32 as
the own error) and the product's one bound check (ettin_export.parity.check_bound)."""

from __future__ import annotations

from ettin_export.checkpoint import load_checkpoint
from ettin_export.parity import BoundCheck, References, check_bound
from ettin_export.parity.references import fp32_references
from ettin_export.targets import FP32_BOUNDS
from ettin_runtime.packing import PairEncoder


def references_for(path, pairs, max_length: int | None = None) -> References:
    checkpoint = load_checkpoint(str(path), max_length=max_length)
    return fp32_references(checkpoint, pairs, PairEncoder.from_dir(path, checkpoint.max_length))


def assert_fp32_parity(candidate, references: References) -> BoundCheck:
    check = check_bound(candidate, references, FP32_BOUNDS)
    assert check.passed, f"fp32 parity fails: {check.describe()}"
    return check


def fails_fp32_parity(candidate, references: References) -> BoundCheck:
    check = check_bound(candidate, references, FP32_BOUNDS)
    assert not check.passed, f"fp32 parity should fail but holds: {check.describe()}"
    return check
