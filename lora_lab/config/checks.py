"""The checks every config schema runs in ``__post_init__``: one sentence naming the key and
what is allowed."""

from __future__ import annotations

import math
from typing import Any

from lora_lab.errors import ConfigError


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def choice(value: Any, key: str, allowed: tuple) -> None:
    require(value in allowed, key, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


def positive(value: Any, key: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    bound = ">= 0" if allow_zero else "> 0"
    require(ok, key, f"must be a number {bound}, got {value!r}")
