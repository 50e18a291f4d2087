"""Same scores (docs/design.md, "Same scores"): parity sets (sets.py), the references a candidate is judged against
(references.py: the fp64 anchor, CrossEncoder's own fp32 error, the bf16 flash reference), the bound,
metrics and report (rule.py), and the parity run build and verify share (run.py)."""

from ettin_export.parity.rule import (
    BoundCheck,
    ParityMetrics,
    ParityReport,
    References,
    check_bound,
    format_report,
    judge,
    spearman,
)
from ettin_export.parity.sets import Group, builtin_parity_set, flatten, read_parity_file

__all__ = ["BoundCheck", "Group", "ParityMetrics", "ParityReport", "References", "builtin_parity_set", "check_bound",
           "flatten", "format_report", "judge", "read_parity_file", "spearman"]
