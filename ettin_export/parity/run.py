"""The parity flow `build` (both targets) and `verify` share, once:

    run = reference_run(checkpoint, encoder, groups, ...)   # fp64 anchor + CrossEncoder fp32, port-checked
    report = run.judge(target, "onnxruntime fp32 (CPU)", candidate_scores)

`reference_run` computes the references of the parity set (and of the export's validation grid, when
asked) in one pass of each reference model, then proves the anchor is what CrossEncoder computes
(references.check_port: the fp32 rule both ways) before any candidate is judged. `judge` applies the
target's bounds; for a bf16 candidate it measures the packed model's own bf16 scores (flash attention on
a GPU) against the same fp64 anchor first, once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ettin_export.parity.references import (
    PortCheck,
    bf16_references,
    check_port_on_sample,
    fp32_references,
)
from ettin_export.parity.rule import ParityReport, References, judge
from ettin_export.parity.sets import Group, flatten
from ettin_export.targets import Target


@dataclass
class ReferenceRun:
    checkpoint: object  # ettin_export.checkpoint.Checkpoint
    encoder: object  # ettin_runtime.packing.PairEncoder
    device: str
    groups: list[Group]
    pairs: list[tuple[str, str]]
    spans: list[slice]
    references: References  # of `pairs`: the fp64 anchor, CrossEncoder fp32 (or the packed fp32 model)
    grid: list[list[tuple[str, str]]]  # validation batches, one per shape (empty unless asked)
    grid_references: References | None
    port: PortCheck | None  # None when CrossEncoder was not run
    crossencoder: bool
    lowp: References | None = None  # the bf16 own reference of `pairs`, once computed (lowp_references)

    @property
    def anchor(self) -> tuple[np.ndarray, str]:
        return self.references.anchor, self.references.anchor_name

    def judge(self, target: Target, candidate_name: str, candidate: np.ndarray,
              bf16_reference: Callable[..., References] | None = None, *, precision: str | None = None) -> ParityReport:
        """The verdict on `candidate` (scores of `pairs`, in order) under the target's bounds at the
        candidate's precision. Where the own reference is the packed model in bf16 (the bf16 gates: flash
        attention on a GPU, the reference attention on a CPU), it is measured against the same anchor
        (`bf16_reference`, by default `lowp_references`, once per run); int8 and fp32 are judged against
        fp32's references."""
        precision = precision or target.precision
        references = self.references
        if target.bounds_for(precision).needs_lowp_reference:
            references = (bf16_reference(self.checkpoint, self.pairs, self.encoder, self.anchor)
                          if bf16_reference is not None else self.lowp_references())
        return judge(target, candidate_name, np.asarray(candidate), references, self.spans, precision=precision)

    def lowp_references(self) -> References:
        """The fp64 anchor beside the packed model in bf16 on this run's device (flash attention on CUDA, the
        reference attention on a CPU), computed on the first call and kept: every bf16 verdict of the run uses it."""
        if self.lowp is None:
            self.lowp = bf16_references(self.checkpoint, self.pairs, self.encoder, self.device, self.anchor)
        return self.lowp


def reference_run(checkpoint, encoder, groups: Sequence[Group], *, device: str, steps, crossencoder: bool = True,
                  grid: list[list[tuple[str, str]]] | None = None, model=None) -> ReferenceRun:
    """References of the parity set (+ the validation grid) and the port check. `model`: the fp32
    packed model on the CPU, reused for the port check's fp32 pass there. Raises
    references.ReferenceMismatch when the packed model does not compute what CrossEncoder computes."""
    pairs, spans = flatten(groups)
    grid = list(grid or [])
    grid_pairs = [pair for batch in grid for pair in batch]
    everything = pairs + grid_pairs
    own = "CrossEncoder in fp32" if crossencoder else "the packed model in fp32"
    with steps.step(f"reference runs on {len(everything)} pairs: the packed model in fp64, {own}"):
        references = fp32_references(checkpoint, everything, encoder, device, crossencoder=crossencoder)
    parity_refs = references.subset(np.arange(len(pairs)))
    grid_refs = references.subset(np.arange(len(pairs), len(everything))) if grid else None
    port = None
    if crossencoder:
        with steps.step("checking the packed model against CrossEncoder (the fp32 rule both ways)"):
            port = check_port_on_sample(checkpoint, pairs, parity_refs, encoder, device,
                                        model=model if device == "cpu" else None)
        steps.note(f"packed model vs CrossEncoder {port.describe()}")
    return ReferenceRun(checkpoint, encoder, device, list(groups), pairs, spans, parity_refs, grid, grid_refs, port,
                        crossencoder)
