"""Summary statistics of plain lists of numbers, pure Python (no torch): written once for every report.

The held-out comparison and monitor rewards of ``rlhf train`` (``engine/report.py``, ``engine/monitor.py``),
``rlhf sample``'s summary and ``rlhf reward``'s pair accuracy (``reward_model/evaluate.py``) all quote a
mean ± its standard error with this one formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values``: sample standard deviation (n - 1) / sqrt(n); 0 for n < 2."""
    count = len(values)
    if count < 2:
        return 0.0
    mean = sum(values) / count
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (count - 1) / count)
