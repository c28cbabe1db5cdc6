"""Numbers that may be missing: a score that could not be measured is NaN (or None), never a
zero, and every page and sentence shows it as such."""

from __future__ import annotations

import math
from typing import Optional


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
