"""Value checks shared by the runtime and the exporter."""

from __future__ import annotations

import numpy as np


def whole_number(value, *, minimum: int = 1, allow_numpy: bool = False) -> bool:
    """Whether `value` is an integer of at least `minimum` and not a bool: a Python int, or with
    `allow_numpy` also a numpy integer (np.int64, ...). Callers raise their own error when it is not."""
    kinds = (int, np.integer) if allow_numpy else int
    return isinstance(value, kinds) and not isinstance(value, bool) and value >= minimum
