"""Numbers that may be missing: a score that could not be measured is NaN (or None), never a
zero, and every page and sentence shows it as such."""

from __future__ import annotations

import math
from typing import List, Optional


def number(x) -> Optional[float]:
    """``x`` as a float, or None where it is missing (None or NaN)."""
    if x is None:
        return None
    if hasattr(x, "item"):  # numpy / torch scalars
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return None if math.isnan(x) else float(x)


def fmt(x, spec: str = ".3g", missing: str = "n/a") -> str:
    """``x`` formatted with ``spec``; ``missing`` where it is None or NaN."""
    v = number(x)
    return missing if v is None else format(v, spec)


def wilson(hits: int, n: int) -> List[Optional[float]]:
    """95% Wilson score interval of a proportion (None for n = 0)."""
    if n == 0:
        return [None, None]
    z, p = 1.959964, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]
